"""Session fixtures for the sd3 family's tests, over the SD 3.5 Medium repo of tests/plugins/teacher_repos.py:

- `sd3_repo`: that repo as a folder (`sd35_medium_folder`: bf16 MMDiT with dual attention and qk RMS-norm, fp16
  CLIP-L / CLIP-G / sharded T5, the root `sd3.5_medium.safetensors` and `text_encoders/`)
- `sd3_repo_no_t5`: the same repo as diffusers saves a pipeline loaded with `text_encoder_3=None,
  tokenizer_3=None`: no text_encoder_3/ or tokenizer_3/, both named null in model_index.json (hard links, no copy)
- `sd3_hub`: the offline hub cache holding it switched on for one test (`teacher_hub`); yields the repo id
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

T5_PARTS = ("text_encoder_3", "tokenizer_3")


@pytest.fixture(scope="session")
def sd3_repo(sd35_medium_folder: Path) -> Path:
    return sd35_medium_folder


@pytest.fixture(scope="session")
def sd3_repo_no_t5(sd35_medium_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd35-no-t5") / "sd35-no-t5"
    shutil.copytree(
        sd35_medium_folder,
        folder,
        ignore=shutil.ignore_patterns(*T5_PARTS, "text_encoders", "*.safetensors.index.json.lock"),
        copy_function=os.link,
    )
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update({k: [None, None] for k in T5_PARTS})
    index_file.unlink()  # a hard link to the original: write a new file
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True))
    return folder


@pytest.fixture
def sd3_hub(teacher_hub: Path) -> Iterator[str]:
    from tests.support.teacher_repos import SD35_MEDIUM

    yield SD35_MEDIUM
