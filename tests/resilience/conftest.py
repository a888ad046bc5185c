"""The fault suite's shared parts: a SeaweedFS server the tests own (so they can kill it, restart it on the same
ports and data, and give it a read-only key), and cheap child processes. The table of injected faults is the
`faults` fixture of tests/plugins/faults.py (a plugin, so the pytest-xdist controller prints it too)."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import REPO

OUTPUT = REPO / "test-output" / "resilience.json"


# ------------------------------------------------------------------------------------------- SeaweedFS
@dataclass
class OwnedSeaweed:
    """A `weed mini` this module owns: kill() / restart() on the same ports and data dir, and a read-only key."""

    data_dir: Path
    admin_key: str
    admin_secret: str = field(repr=False)
    reader_key: str = "instaflow-reader"
    reader_secret: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    bucket: str = "resilience"
    server: object | None = None
    restarts: int = 0

    def _identities(self) -> list[dict]:
        return [
            {
                "name": "reader",
                "credentials": [{"accessKey": self.reader_key, "secretKey": self.reader_secret}],
                "actions": ["Read", "List"],
            }
        ]

    def start(self) -> None:
        from infra import seaweed

        ports = getattr(self.server, "ports", None)
        self.server = seaweed.start(
            self.data_dir,
            access_key=self.admin_key,
            secret_key=self.admin_secret,
            bucket=self.bucket if ports is None else None,  # the bucket survives a restart
            ports=ports,
            extra_identities=self._identities(),
            timeout=60,
        )

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def kill(self) -> None:
        """SIGKILL, as a crashed or rebooted server: no clean shutdown."""

        from infra.procs import pid_alive

        with_pid = self.server.pid
        os.killpg(with_pid, signal.SIGKILL)  # weed runs in its own process group
        deadline = time.monotonic() + 15
        while pid_alive(with_pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        from infra import seaweed
        from infra.procs import port_bindable, wait_until

        assert wait_until(lambda: all(port_bindable(p) for p in self.server.ports.all()), 30)
        seaweed.remove_sockets(self.server.ports)  # a killed weed leaves its unix sockets behind
        for sock in self.data_dir.glob("*.sock"):
            sock.unlink(missing_ok=True)
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if self.server is not None and self.server.alive():
            self.server.stop()


@pytest.fixture(scope="module")
def owned_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnedSeaweed]:
    from infra import seaweed

    try:
        seaweed.find_weed()
    except seaweed.SeaweedError as err:
        pytest.skip(str(err))
    s3 = OwnedSeaweed(tmp_path_factory.mktemp("owned-weed"), "instaflow-admin", secrets.token_hex(16))
    s3.start()
    try:
        yield s3
    finally:
        s3.stop()


# ------------------------------------------------------------------------------------------- children
@pytest.fixture(scope="session")
def children():
    """Child processes forked from a preloaded server: a SIGKILL target costs ~0.3 s instead of an import."""
    from tests.resilience import children as mod

    yield mod
    mod.shutdown()
