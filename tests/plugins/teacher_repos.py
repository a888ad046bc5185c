"""Session fixtures: today's teacher repos (tests/support/teacher_repos.py) as folders and as one offline hub cache.

Each repo is built lazily, once per session, into the pytest tmp dir, the first time a test asks for it; the hub
cache entries are hard links to the folders' files (no extra disk). Measured on the 2-core CPU once diffusers and
transformers are imported (~7 s, paid by whatever test imports them first): SDXL base ~1 s / 62 MB (48 MB without
the fp16 variants: two VAEs and two fp16 root checkpoints), SD 3.5 medium ~0.4 s / 24 MB, FLUX.1-dev and -schnell
~0.3 s / 22 MB each, SD 2.1 ~0.5 s / 53 MB (42 MB without variants). Widths are those of the SD 1.5 fixture (UNet
32/64/64(/64), VAE 32/64/64/64), the smallest that keep every key kind of the real checkpoints; the transformers
are 128 wide.

- `teacher_repo`: factory `teacher_repo(hub_id) -> Path`, the repo folder (built on first use, then cached)
- `sdxl_folder`, `sd35_medium_folder`, `flux_dev_folder`, `flux_schnell_folder`, `sd21_folder`: one folder each
  (read-only by convention: the hub cache links to their files)
- `teacher_hf_home`: one HF_HOME whose hub cache holds all five repos under their real hub ids
- `teacher_hub`: that cache switched on for one test, offline (HF_HOME + HF_HUB_OFFLINE, huggingface_hub's module
  constants included, restored after); yields the HF_HOME path, e.g. for a subprocess's environment. Then
  `DiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell")` resolves with no network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def teacher_repo(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    from tests.support import teacher_repos

    parent = tmp_path_factory.mktemp("teacher_repos")
    built: dict[str, Path] = {}

    def get(repo_id: str) -> Path:
        if repo_id not in built:
            built[repo_id] = teacher_repos.build_repo(repo_id, parent)
        return built[repo_id]

    return get


@pytest.fixture(scope="session")
def sdxl_folder(teacher_repo: Callable[[str], Path]) -> Path:
    from tests.support.teacher_repos import SDXL

    return teacher_repo(SDXL)


@pytest.fixture(scope="session")
def sd35_medium_folder(teacher_repo: Callable[[str], Path]) -> Path:
    from tests.support.teacher_repos import SD35_MEDIUM

    return teacher_repo(SD35_MEDIUM)


@pytest.fixture(scope="session")
def flux_dev_folder(teacher_repo: Callable[[str], Path]) -> Path:
    from tests.support.teacher_repos import FLUX_DEV

    return teacher_repo(FLUX_DEV)


@pytest.fixture(scope="session")
def flux_schnell_folder(teacher_repo: Callable[[str], Path]) -> Path:
    from tests.support.teacher_repos import FLUX_SCHNELL

    return teacher_repo(FLUX_SCHNELL)


@pytest.fixture(scope="session")
def sd21_folder(teacher_repo: Callable[[str], Path]) -> Path:
    from tests.support.teacher_repos import SD21

    return teacher_repo(SD21)


@pytest.fixture(scope="session")
def teacher_hf_home(teacher_repo: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support import teacher_repos

    hf_home = tmp_path_factory.mktemp("teacher_hf_home")
    for repo_id in teacher_repos.REPOS:
        teacher_repos.install_in_hub_cache(teacher_repo(repo_id), hf_home, repo_id)
    return hf_home


@pytest.fixture
def teacher_hub(teacher_hf_home: Path) -> Iterator[Path]:
    from tests.support.hub_cache import offline_hub

    with offline_hub(teacher_hf_home):
        yield teacher_hf_home
