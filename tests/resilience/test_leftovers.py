"""Nothing is left behind by a killed CLI: its embedded Prefect API server dies with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from tests.support import REPO

SERVER_MARK = "prefect.server.api.server:create_app"


def _find(parent: psutil.Process, mark: str) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if mark in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def _cli_env(home) -> dict[str, str]:
    """A CLI's environment without an API URL: it starts its own embedded Prefect server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return env | {
        "PYTHONPATH": str(REPO),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(home),
    }


def test_sigkill_of_the_cli_stops_its_embedded_prefect_server(tmp_path, faults) -> None:
    env = _cli_env(tmp_path)
    caps = tmp_path / "caps.txt"
    caps.write_text("a photo of a cat on a sofa\n" * 3)
    cmd = [sys.executable, "-m", "flows.cli", "curate", "--set", f"storage.root={tmp_path / 'store'}"]
    cmd += ["--set", f"curation.sources=[{{path: '{caps}'}}]"]
    log = (tmp_path / "cli.log").open("wb")
    cli = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = None
    try:
        parent = psutil.Process(cli.pid)
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and cli.poll() is None:
            server = _find(parent, SERVER_MARK)
            if server is not None:
                break
            time.sleep(0.1)
        time.sleep(2.0)  # the server answers and the CLI goes on with its run
        assert server is not None and cli.poll() is None, (tmp_path / "cli.log").read_text()[-3000:]
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(30)
        gone = psutil.wait_procs([server], timeout=30)[0]
        faults.record("test_leftovers", "SIGKILL of the CLI (embedded API)", 1, note="server stopped")
        assert gone, f"the embedded Prefect server (pid {server.pid}) outlived the killed CLI"
    finally:
        log.close()
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        if server is not None and server.is_running():
            server.kill()


# A CLI that dies the instant its server process is spawned (before the watchdog's next look at its children):
# the server is already re-parented when the watchdog looks, and is found by the owner token in its environment.
_DIE_AT_SPAWN = """
import os, signal, sys
from prefect.server.api.server import SubprocessASGIServer
from flows.cli.server import start_embedded_api
spawn = SubprocessASGIServer._run_uvicorn_command
def spawn_then_die(self):
    proc = spawn(self)
    print(proc.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
SubprocessASGIServer._run_uvicorn_command = spawn_then_die
start_embedded_api()
"""


def test_a_cli_killed_as_its_server_spawns_leaves_no_server(tmp_path, faults) -> None:
    env = _cli_env(tmp_path)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with (
        out.open("wb") as fout,
        err.open("wb") as ferr,
    ):  # files, not pipes: a surviving server would hold a pipe
        code = subprocess.run(
            [sys.executable, "-c", _DIE_AT_SPAWN], env=env, cwd=tmp_path, stdout=fout, stderr=ferr,
            timeout=300, start_new_session=True,
        ).returncode  # fmt: skip
    assert code == -signal.SIGKILL, err.read_text()[-2000:]
    pid = int(out.read_text().split()[0])
    try:
        server = psutil.Process(pid)
    except psutil.NoSuchProcess:
        server = None  # already stopped
    try:
        gone = server is None or psutil.wait_procs([server], timeout=30)[0]
        faults.record("test_leftovers", "SIGKILL of the CLI as its API spawns", 1, note="server stopped")
        assert gone, f"the embedded Prefect server (pid {pid}) outlived a CLI killed as it spawned it"
    finally:
        if server is not None and server.is_running():
            server.kill()
