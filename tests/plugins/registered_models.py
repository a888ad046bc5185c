"""`registered_tiny`: a sqlite MLflow registry holding a tiny one-step model as the register stage leaves it.

Registered once per session through the real path (tasks/registration.register_model: pyfunc from code, the
diffusers folder as its artifact, the inference defaults as model_config), tagged with the lineage tags the
register flow writes (registration/rules.py `lineage_tags`), and aliased `champion`, as a `make demo` rebuild
leaves it. The model is the tiny SD-architecture one (random init, fixed seed): what its images look like does
not matter, that every way of using it gives the same ones does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

NAME = "instaflow-use"
LINEAGE = {
    "prompts": "/s/lance/prompts@v3",
    "triplets": "/s/lance/triplets@v7",
    "instaflow": "instaflow:/s/models/instaflow-x#h3",
}
METRICS = {"fid": 41.5, "clip_score": 0.21}


@dataclass
class RegisteredTiny:
    name: str
    version: str
    tracking_uri: str
    folder: Path  # the diffusers folder that was registered
    root: Path

    @property
    def cli(self) -> list[str]:
        """The options that point a CLI command at this registry."""
        return ["--tracking-uri", self.tracking_uri]


@pytest.fixture(scope="session")
def registered_tiny(tmp_path_factory: pytest.TempPathFactory) -> RegisteredTiny:
    from instaflow_core.config import RegistrationConfig, StorageConfig, load
    from instaflow_core.models.sd import build_tiny
    from instaflow_core.refs import ModelRef
    from instaflow_core.registration.rules import lineage_tags
    from tasks.caching import code_version, git_sha
    from tasks.registration import register_model
    from tasks.tracking.client import mlflow_client
    from tasks.tracking.promotion import CHAMPION

    root = tmp_path_factory.mktemp("registered")
    folder = build_tiny().save(root / "models" / "instaflow")
    storage = StorageConfig(root=f"file://{root / 'store'}")
    registry = RegistrationConfig(experiment="use", model_name=NAME)
    ref = ModelRef(uri=f"file://{folder}", kind="instaflow", config_hash="h-use")
    tags = lineage_tags(
        load("tiny"), LINEAGE, {"uri": "/s/eval/e.json", "run_id": "eval-run-1"},
        code_version=code_version(), git_sha=git_sha(),
    )  # fmt: skip
    inference = {"num_inference_steps": 1, "guidance_scale": 1.0, "dtype": "float32"}
    reg = register_model.fn(registry, storage, ref, NAME, METRICS, tags, inference)
    with mlflow_client(registry, storage) as client:
        client.set_registered_model_alias(NAME, CHAMPION, reg["version"])
    return RegisteredTiny(NAME, reg["version"], reg["tracking_uri"], folder, root)
