"""The embedded Prefect API of a CLI run dies with the CLI, even when the CLI is SIGKILLed.

Without `PREFECT_API_URL`, Prefect starts a temporary API server (`uvicorn ... prefect.server.api.server:
create_app`) as a child process and stops it at exit (atexit). A SIGKILLed CLI runs no atexit handler, so the
server (~200 MB) lived on. Here the CLI starts that same server itself, up front (Prefect's
`SubprocessASGIServer`, the singleton its client then reuses), and then a tiny watchdog process that polls its
parent: when the CLI is gone, the watchdog stops the server and exits. On a normal exit the watchdog is
stopped first, then Prefect stops the server as before. The server's own output goes to the run's log file.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys

MARK = "prefect.server.api.server:create_app"  # in the command line of Prefect's ephemeral server
# The watchdog: no imports beyond os/time/signal, so it starts in milliseconds and holds ~10 MB. It starts
# *before* the server and finds it among its parent's children in /proc (Linux), so a kill during the server's
# start-up (which can take 40 s on a busy machine) is covered too; elsewhere it finds nothing and does nothing.
_WATCHDOG = """
import os, signal, sys, time
parent, mark = int(sys.argv[1]), sys.argv[2].encode()
def info(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[1]), fields[19], fields[0]  # ppid, start time, state
def servers():
    out = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not d.isdigit():
            continue
        try:
            ppid, start, _ = info(d)
            if ppid == parent:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if mark in f.read():
                        out[int(d)] = start
        except (OSError, ValueError, IndexError):
            pass
    return out
seen = {}
while os.getppid() == parent:
    seen.update(servers())
    time.sleep(0.25)
def same(pid, start):
    try:
        _, now, state = info(pid)
    except (OSError, ValueError, IndexError):
        return False
    return now == start and state not in (b"Z", b"X")
for pid, start in seen.items():
    if same(pid, start):
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not same(pid, start):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
"""


@contextlib.contextmanager
def _stdio_to(path: os.PathLike | None):  # noqa: ANN202
    """Point fds 1 and 2 at `path` while a child is started (it inherits them); restored after."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def start_embedded_api(log_path: os.PathLike | None = None) -> int | None:
    """Start Prefect's ephemeral API now (when no PREFECT_API_URL is set) under a watchdog; returns its pid.

    With `log_path`, the server's own output (uvicorn, SQLAlchemy tracebacks at shutdown) goes to that file
    instead of the terminal: it inherits a stderr pointing there."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    watchdog = subprocess.Popen(
        [sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), MARK],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )

    def _stop_watchdog() -> None:  # runs before Prefect's own atexit stop (LIFO): no double kill
        if watchdog.poll() is None:
            watchdog.send_signal(signal.SIGTERM)
            try:
                watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                watchdog.kill()

    server = SubprocessASGIServer()  # the singleton Prefect's client uses when there is no API URL
    with _stdio_to(log_path):
        server.start()  # registers Prefect's atexit stop, after which ours (LIFO) runs first
    atexit.register(_stop_watchdog)
    proc = server.server_process
    return proc.pid if proc is not None else None
