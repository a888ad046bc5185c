"""The local stack end to end: up -> healthy -> up again (no twins) -> down -> nothing listening."""

from __future__ import annotations

import stat

import pytest
from typer.testing import CliRunner

from infra import seaweed, stack
from infra.procs import free_port, pid_alive, port_in_use
from instaflow_core.config import StorageConfig
from instaflow_core.store import Store

pytestmark = pytest.mark.xdist_group("local-stack")  # the stack's default ports: one worker at a time


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stack_up_status_up_again_down(tmp_path, monkeypatch):
    try:
        seaweed.find_weed()
    except seaweed.SeaweedError as err:
        pytest.skip(str(err))
    state = tmp_path / "stack"
    ports = {"s3_port": free_port(), "prefect_port": free_port(), "mlflow_port": free_port()}
    lines: list[str] = []
    try:
        first = stack.up(state, **ports, echo=lines.append)
        assert [s.name for s in first] == ["s3", "prefect", "mlflow"]
        assert all(s.running and s.healthy for s in first), first
        assert [s.port for s in first] == list(ports.values())
        pids = {s.name: s.pid for s in first}

        # keys: generated once, 0600, never in what we print
        key, secret = stack.credentials(state)
        assert stat.S_IMODE(stack.credentials_path(state).stat().st_mode) == 0o600
        exports = "\n".join(stack.export_lines(state))
        assert (
            secret not in exports
            and f"PREFECT_API_URL=http://127.0.0.1:{ports['prefect_port']}/api" in exports
        )
        env = stack.env(state)
        assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow_port']}"
        assert env["AWS_SECRET_ACCESS_KEY"] == secret

        # its S3 works with the Store and has the bucket
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        store = Store(
            StorageConfig(root=f"s3://{env['INSTAFLOW_S3_BUCKET']}/t", s3_endpoint=env["AWS_ENDPOINT_URL"])
        )
        store.check()
        store.write_bytes(store.uri("hello"), b"hi")

        # up again: nothing new starts, same pids, all healthy
        again = stack.up(state, echo=lines.append)
        assert {s.name: s.pid for s in again} == pids
        assert sum("already running" in line for line in lines) == 3

        # the CLI prints URLs, health and exports, not the secret
        res = CliRunner().invoke(_cli_app(), ["status", "--state-dir", str(state)])
        assert res.exit_code == 0, res.output
        assert res.output.count("healthy") == 3 and secret not in res.output

        # another state folder asking for a port this stack holds is told so, and starts nothing
        with pytest.raises(stack.StackError, match="in use by another program"):
            stack.up(tmp_path / "other", s3_port=ports["s3_port"], echo=lines.append)
    finally:
        stopped = stack.down(state, timeout=20, echo=lines.append)

    assert sorted(stopped) == ["mlflow", "prefect", "s3"]
    assert not any(pid_alive(p) for p in pids.values())
    after = stack.status(state)
    assert not any(s.running or s.healthy for s in after)
    weed_ports = stack.load_state(state)["weed_ports"]
    for port in [*ports.values(), *weed_ports.values()]:
        assert not port_in_use(port), f"port {port} still listening"
    assert not list(state.glob("*.pid"))
    assert stack.down(state, echo=lines.append) == []  # idempotent


def _cli_app():
    from flows.cli.stack import app

    return app
