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
import secrets
import signal
import subprocess
import sys

MARK = "prefect.server.api.server:create_app"  # in the command line of Prefect's ephemeral server
OWNER_ENV = "INSTAFLOW_EMBEDDED_API_OWNER"  # in its environment: which CLI started it
# The watchdog: no imports beyond os/time/signal, so it starts in milliseconds and holds ~10 MB. It starts
# *before* the server and finds it in /proc (Linux), so a kill during the server's start-up (which can take 40 s
# on a busy machine) is covered too; elsewhere it finds nothing and does nothing. While the CLI lives it notes the
# servers among its children; once the CLI is gone the server has been re-parented, so it also looks for any
# process whose environment holds this CLI's owner token (set only while the server is started, inherited by it):
# that covers a kill in the moment between the server's start and the watchdog's next look. It looks for a few
# seconds, for a server that was forked but had not yet exec'd when the CLI died.
_WATCHDOG = """
import os, signal, sys, time
parent, mark, token = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3].encode()
def info(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[1]), fields[19], fields[0]  # ppid, start time, state
me = os.getpid()  # the mark is in this watchdog's own argv too: never count (or kill) itself
def scan(is_server):
    out = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not d.isdigit() or int(d) == me:
            continue
        try:
            ppid, start, _ = info(d)
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if mark in f.read() and is_server(d, ppid):
                    out[int(d)] = start
        except (OSError, ValueError, IndexError):
            pass
    return out
def child(d, ppid):
    return ppid == parent
def owned(d, ppid):
    with open(f"/proc/{d}/environ", "rb") as f:
        return token in f.read().split(b"\\0")
seen = {}
while os.getppid() == parent:
    seen.update(scan(child))
    time.sleep(0.25)
for _ in range(12):  # ~3 s: a server forked just before the CLI died may still be exec'ing
    seen.update(scan(owned))
    time.sleep(0.25)
def same(pid, start):
    try:
        _, now, state = info(pid)
    except (OSError, ValueError, IndexError):
        return False
    return now == start and state not in (b"Z", b"X")
def signal_all(sig):
    for pid, start in seen.items():
        if same(pid, start):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
signal_all(signal.SIGTERM)
for _ in range(50):  # 5 s to stop (a server still importing may not answer SIGTERM), then SIGKILL
    if not any(same(pid, start) for pid, start in seen.items()):
        break
    time.sleep(0.1)
else:
    signal_all(signal.SIGKILL)
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

    token = f"{OWNER_ENV}={os.getpid()}-{secrets.token_hex(8)}"
    watchdog = subprocess.Popen(
        [sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), MARK, token],
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
    os.environ[OWNER_ENV] = token.split("=", 1)[1]  # the server inherits it (Prefect passes os.environ on)
    try:
        with _stdio_to(log_path):
            server.start()  # registers Prefect's atexit stop, after which ours (LIFO) runs first
    finally:
        os.environ.pop(OWNER_ENV, None)  # later children (workers) are not the server's kin
    atexit.register(_stop_watchdog)
    proc = server.server_process
    return proc.pid if proc is not None else None
