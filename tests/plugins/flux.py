"""Session fixtures: FLUX.1-dev- and FLUX.1-schnell-shaped repos (tests/support/flux.py) as folders, and as the offline
hub cache entries of `black-forest-labs/FLUX.1-dev` and `black-forest-labs/FLUX.1-schnell` (one HF_HOME for both).

- `flux_dev_repo` / `flux_schnell_repo`: local folders (read-only by convention: the hub cache links to them)
- `flux_hf_home`: an HF_HOME whose hub cache holds both under their hub ids
- `flux_hub`: that cache switched on for one test, offline; yields {"dev": repo id, "schnell": repo id}
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def flux_dev_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support import flux

    return flux.build_flux_folder(tmp_path_factory.mktemp("flux-dev") / "FLUX.1-dev", "dev")


@pytest.fixture(scope="session")
def flux_schnell_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support import flux

    return flux.build_flux_folder(tmp_path_factory.mktemp("flux-schnell") / "FLUX.1-schnell", "schnell")


@pytest.fixture(scope="session")
def flux_hf_home(
    flux_dev_repo: Path, flux_schnell_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from tests.support import flux

    hf_home = tmp_path_factory.mktemp("hf_home_flux")
    flux.install_in_hub_cache(flux_dev_repo, hf_home, flux.REPO_IDS["dev"])
    flux.install_in_hub_cache(flux_schnell_repo, hf_home, flux.REPO_IDS["schnell"])
    return hf_home


@pytest.fixture
def flux_hub(flux_hf_home: Path) -> Iterator[dict[str, str]]:
    from tests.support import flux

    with flux.offline_hub(flux_hf_home):
        yield dict(flux.REPO_IDS)
