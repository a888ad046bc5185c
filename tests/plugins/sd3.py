"""Session fixtures: the SD 3.5 Medium-shaped repo (tests/support/sd3.py) as a folder (with T5 and without), and
as the offline hub cache entry of `stabilityai/stable-diffusion-3.5-medium`.

- `sd3_repo` / `sd3_repo_no_t5`: local folders (read-only by convention: the hub cache links to `sd3_repo`)
- `sd3_hf_home`: an HF_HOME whose hub cache holds `sd3_repo` under the hub id
- `sd3_hub`: that cache switched on for one test, offline; yields the repo id
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sd3_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support import sd3

    return sd3.build_sd35_folder(tmp_path_factory.mktemp("sd35") / "stable-diffusion-3.5-medium")


@pytest.fixture(scope="session")
def sd3_repo_no_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support import sd3

    return sd3.build_sd35_folder(tmp_path_factory.mktemp("sd35-no-t5") / "sd35-no-t5", t5=False)


@pytest.fixture(scope="session")
def sd3_hf_home(sd3_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support import sd3

    hf_home = tmp_path_factory.mktemp("hf_home_sd3")
    sd3.install_in_hub_cache(sd3_repo, hf_home)
    return hf_home


@pytest.fixture
def sd3_hub(sd3_hf_home: Path) -> Iterator[str]:
    from tests.support import sd3

    with sd3.offline_hub(sd3_hf_home):
        yield sd3.REPO_ID
