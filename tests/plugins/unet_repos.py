"""Session fixtures: the tiny SDXL base- and SD 2.1-shaped repos (tests/support/unet_repos.py) as local folders
and as offline Hugging Face cache entries under their real hub ids.

- `tiny_sdxl_folder` / `tiny_sd21_folder`: the repos as local diffusers folders (read-only by convention: the
  hub cache hard-links their files)
- `unet_repos_hf_home`: an HF_HOME whose hub cache holds both
- `tiny_sdxl_hub` / `tiny_sd21_hub`: that cache switched on for one test, offline; yield the repo id
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support import unet_repos

    return unet_repos.build_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "stable-diffusion-xl-base-1.0")


@pytest.fixture(scope="session")
def tiny_sd21_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support import unet_repos

    return unet_repos.build_sd21_folder(tmp_path_factory.mktemp("sd21") / "stable-diffusion-2-1")


@pytest.fixture(scope="session")
def unet_repos_hf_home(
    tiny_sdxl_folder: Path, tiny_sd21_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from tests.support import unet_repos

    hf_home = tmp_path_factory.mktemp("unet_repos_hf_home")
    unet_repos.install(tiny_sdxl_folder, hf_home, unet_repos.SDXL_REPO)
    unet_repos.install(tiny_sd21_folder, hf_home, unet_repos.SD21_REPO)
    return hf_home


@pytest.fixture
def tiny_sdxl_hub(unet_repos_hf_home: Path) -> Iterator[str]:
    from tests.support import hub_cache, unet_repos

    with hub_cache.offline_hub(unet_repos_hf_home):
        yield unet_repos.SDXL_REPO


@pytest.fixture
def tiny_sd21_hub(unet_repos_hf_home: Path) -> Iterator[str]:
    from tests.support import hub_cache, unet_repos

    with hub_cache.offline_hub(unet_repos_hf_home):
        yield unet_repos.SD21_REPO
