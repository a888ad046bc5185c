"""Small process and port helpers shared by the SeaweedFS launcher and the local stack.

Services are started in their own session (process group), so stopping one by its pid also stops the
workers it spawned (Prefect's and MLflow's uvicorn children) and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def port_bindable(port: int, host: str = LOOPBACK) -> bool:
    """True when a server could bind host:port now (nothing listening there).

    SO_REUSEADDR as servers set it: old connections in TIME_WAIT do not block, a listener does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK, avoid: set[int] | None = None, max_port: int = 65535) -> int:
    """A port the OS says is free now (there is a small race until the service binds it)."""
    avoid = avoid or set()
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid and port <= max_port:
            return port
    raise RuntimeError("could not find a free TCP port")


def pid_alive(pid: int | None) -> bool:
    """True when pid runs and is not a zombie (a child we have not reaped yet counts as dead)."""
    if not pid or pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        # Reap it if it is our own exited child (the test process starts the stack in-process).
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        with contextlib.suppress(OSError, IndexError):
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            return state not in ("Z", "X")
    return True


def pid_cmdline(pid: int) -> str:
    """The process's command line ('' where /proc is unavailable)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_pid(pid: int, timeout: float = 15.0, group: bool = True) -> bool:
    """SIGTERM the process (and its group when it leads one), SIGKILL after `timeout` s. True if it was running."""
    return bool(stop_pids([pid], timeout=timeout, group=group))


def stop_pids(pids: list[int], timeout: float = 15.0, group: bool = True) -> list[int]:
    """Stop several processes at once (SIGTERM all, wait, SIGKILL the rest); returns those that were running."""
    live = [p for p in pids if pid_alive(p)]

    def _send(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pid in groups:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    groups = {p for p in live if group and _leads_group(p)}

    def _running(pid: int) -> bool:
        # a server's children (prefect's uvicorn, mlflow's workers) outlive their leader for a moment:
        # the service is down only when its whole process group is gone
        return pid_alive(pid) or (pid in groups and _group_alive(pid))

    for pid in live:
        _send(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in live):
        time.sleep(0.1)
    for pid in live:
        if _running(pid):
            _send(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_running(p) for p in live):
        time.sleep(0.1)
    return live


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except (ProcessLookupError, PermissionError):
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when a GET on url answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback URLs we build)
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    *,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.2,
) -> bool:
    """Poll `check` until it is true (True), `alive` turns false or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if alive is not None and not alive():
            return check()
        time.sleep(interval)
    return check()


def log_tail(path: Path | None, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    if path is None or not Path(path).exists():
        return ""
    text = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])
