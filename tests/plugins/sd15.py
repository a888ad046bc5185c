"""Session fixtures: the SD 1.5-shaped repo (tests/support/sd15.py) as a folder, a hub cache entry, a single file.

Built once per session into the pytest tmp dir (~118 MB: every fp16 / non-EMA variant and the root single-file
checkpoint, as the real repo has them; ~3-5 s once diffusers is imported); the hub cache entry is hard links to
the folder's files (no extra disk). Decision on the size: the variants and the root checkpoint stay in, because
they are what a saved model folder must leave out and what the hub patterns must skip; the widths stay at
(32, 64, 64, 64), the smallest that keeps every key kind of the real checkpoints (VAE nin_shortcut, UNet
skip_connection).

- `sd15_folder`: the repo as a local diffusers folder (read-only by convention: the hub cache links to it)
- `sd15_hf_home`: an HF_HOME whose hub cache holds the same files under `stable-diffusion-v1-5/stable-diffusion-v1-5`
- `sd15_hub`: that cache switched on for one test, offline (HF_HOME + HF_HUB_OFFLINE, module constants included);
  yields the repo id
- `sd15_single_file`: the root `v1-5-pruned-emaonly.safetensors` (original LDM keys)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support import sd15

    return sd15.build_sd15_folder(tmp_path_factory.mktemp("sd15") / "stable-diffusion-v1-5")


@pytest.fixture(scope="session")
def sd15_hf_home(sd15_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support import sd15

    hf_home = tmp_path_factory.mktemp("hf_home")
    sd15.install_in_hub_cache(sd15_folder, hf_home)
    return hf_home


@pytest.fixture
def sd15_hub(sd15_hf_home: Path) -> Iterator[str]:
    from tests.support import sd15

    with sd15.offline_hub(sd15_hf_home):
        yield sd15.REPO_ID


@pytest.fixture(scope="session")
def sd15_single_file(sd15_folder: Path) -> Path:
    from tests.support import sd15

    return sd15_folder / sd15.SINGLE_FILE
