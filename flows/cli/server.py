"""The embedded Prefect API of a CLI run dies with the CLI, even when the CLI is SIGKILLed.

Without `PREFECT_API_URL`, Prefect starts a temporary API server (`uvicorn ... prefect.server.api.server:
create_app`) as a child process and stops it at exit (atexit). A SIGKILLed CLI runs no atexit handler, so the
server (~200 MB) lived on. Here the CLI starts that same server itself, up front (Prefect's
`SubprocessASGIServer`, the singleton its client then reuses), and then a tiny watchdog process that polls its
parent: when the CLI is gone, the watchdog stops the server and exits. On a normal exit the watchdog is
stopped first, then Prefect stops the server as before.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys

# The watchdog: no imports beyond os/time/signal, so it starts in milliseconds and holds ~10 MB.
_WATCHDOG = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return True
while os.getppid() == parent and alive(server):
    time.sleep(0.5)
if alive(server) and os.getppid() != parent:
    os.kill(server, signal.SIGTERM)
    for _ in range(50):
        if not alive(server):
            break
        time.sleep(0.1)
    else:
        os.kill(server, signal.SIGKILL)
"""


def start_embedded_api() -> int | None:
    """Start Prefect's ephemeral API now (when no PREFECT_API_URL is set) under a watchdog; returns its pid."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the singleton Prefect's client uses when there is no API URL
    server.start()
    proc = server.server_process
    if proc is None:
        return None
    watchdog = subprocess.Popen(
        [sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), str(proc.pid)],
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

    atexit.register(_stop_watchdog)
    return proc.pid
