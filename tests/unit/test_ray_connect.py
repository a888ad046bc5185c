"""connect_ray against a stand-in `ray` module: a client session the server fails to start is retried (a fresh
server each time), a dead address is not, and what reaches the user is one ConfigError line."""

from __future__ import annotations

import sys
import types

import pytest

from instaflow_core.config import OrchestrationConfig
from instaflow_core.errors import ConfigError

_SERVER_DIED = ConnectionAbortedError(
    'Initialization failure from server:\nTraceback (most recent call last):\n  File "proxier.py", line 396\n'
    "psutil.ZombieProcess: PID still exists but it's a zombie (pid=32550)"
)


def _fake_ray(monkeypatch: pytest.MonkeyPatch, failures: list[BaseException]) -> dict[str, int]:
    calls = {"init": 0, "shutdown": 0}
    state = {"up": False}

    def init(**kwargs: object) -> None:
        calls["init"] += 1
        if failures:
            raise failures.pop(0)
        state["up"] = True

    def shutdown() -> None:
        calls["shutdown"] += 1
        state["up"] = False

    ray = types.SimpleNamespace(
        init=init, shutdown=shutdown, is_initialized=lambda: state["up"],
        cluster_resources=lambda: {"CPU": 2.0}, nodes=lambda: [{"Alive": True}],
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "ray", ray)
    import tasks.runners as runners

    monkeypatch.setattr(runners, "_CLIENT_INIT_BACKOFF_S", 0.0)
    monkeypatch.setattr(runners, "_RAY", {})
    return calls


def _orch() -> OrchestrationConfig:
    return OrchestrationConfig(task_runner="ray", ray_address="ray://127.0.0.1:10001")


def test_a_client_server_that_fails_to_start_is_retried(monkeypatch, caplog):
    from tasks.runners import connect_ray

    calls = _fake_ray(monkeypatch, [_SERVER_DIED, _SERVER_DIED])
    assert connect_ray(_orch()) == {"CPU": 2.0}
    assert calls == {"init": 3, "shutdown": 2}  # each failed try's half-made context dropped
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and "ZombieProcess" in retries[0]


def test_retries_are_bounded_and_end_in_one_line(monkeypatch):
    from tasks.runners import connect_ray

    calls = _fake_ray(monkeypatch, [_SERVER_DIED] * 5)
    with pytest.raises(ConfigError) as err:
        connect_ray(_orch())
    assert calls["init"] == 3
    msg = str(err.value)
    assert "\n" not in msg and "ray://127.0.0.1:10001" in msg and "ZombieProcess" in msg


def test_nothing_listening_is_not_retried(monkeypatch):
    from tasks.runners import connect_ray

    calls = _fake_ray(monkeypatch, [ConnectionError("ray client connection timeout")])
    with pytest.raises(ConfigError, match="cannot connect to a Ray cluster there"):
        connect_ray(_orch())
    assert calls["init"] == 1
