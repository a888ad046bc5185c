"""Session fixture: a real two-node Ray cluster on loopback (head + one worker node, 1 CPU each).

Started once for the tests that ask for it (~30-60 s on a loaded 2-core machine) and stopped by pid at the
end (infra/ray_local.py; never `ray stop`, which would stop other users' clusters). The nodes get the S3 test
keys in their environment, as a real cluster's nodes carry their own credentials.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> Iterator[object]:
    from infra.ray_local import LocalRayCluster, RayClusterError
    from tests.conftest import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV

    env = {
        S3_ACCESS_KEY_ENV: s3_server.access_key,
        S3_SECRET_KEY_ENV: s3_server.secret_key,
        "HF_HUB_OFFLINE": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    cluster = LocalRayCluster(workers=1, cpus_per_node=1, env=env)
    try:
        cluster.start()
    except (RayClusterError, FileNotFoundError) as err:
        pytest.fail(f"could not start the local Ray cluster: {err}")
    try:
        yield cluster
    finally:
        from tasks.runners import disconnect_ray

        try:
            disconnect_ray()  # this process's driver connection first, then the cluster
        finally:
            cluster.stop()


@pytest.fixture(autouse=True)
def _ray_driver_disconnected_after(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that used the cluster leaves this process connected to it as a driver (`connect_ray` keeps the
    connection for the next stage); drop that after the test, so the raylets' lines forwarded to a connected
    driver (say, a disk-space warning) do not land in later tests' output while the cluster stays up."""
    yield
    if "ray_cluster" in request.fixturenames:
        from tasks.runners import disconnect_ray

        disconnect_ray()
