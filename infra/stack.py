"""The local stack: SeaweedFS S3, a Prefect server and an MLflow server, on loopback, managed by pid files.

Everything lives in one state folder (default ~/.instaflow/stack, or $INSTAFLOW_STACK_DIR):

    stack.json         ports, bucket, region (so status/down/env need no flags)
    credentials.env    the generated S3 keys, mode 0600 (`. credentials.env` exports them)
    <service>.pid      one per running service; logs/<service>.log
    s3/  prefect/  mlflow.db    the services' data (survive down/up)

Each service runs in its own process group, so `down` stops it and the workers it spawned, and nothing
else. `up` is idempotent: a service whose pid is alive and healthy is left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import seaweed
from infra.procs import (
    LOOPBACK,
    http_ok,
    log_tail,
    pid_alive,
    pid_cmdline,
    port_in_use,
    stop_pids,
    wait_until,
)
from instaflow_core.errors import InstaflowError

SERVICES = ("s3", "prefect", "mlflow")
DEFAULT_PORTS = {"s3": 8333, "prefect": 4200, "mlflow": 5000}
DEFAULT_BUCKET = "instaflow"
REGION = "us-east-1"
HEALTH_PATHS = {"s3": "/healthz", "prefect": "/api/health", "mlflow": "/health"}
# A pid is only "ours" when its command line still looks like the service (guards against pid reuse).
CMD_MARKERS = {"s3": ("weed", "mini"), "prefect": ("prefect", "server"), "mlflow": ("mlflow", "server")}
LABELS = {"s3": "S3 (SeaweedFS)", "prefect": "Prefect UI/API", "mlflow": "MLflow UI"}


class StackError(InstaflowError):
    """The local stack cannot be started, reached or stopped as asked."""


@dataclass
class ServiceStatus:
    name: str
    url: str
    port: int
    pid: int | None
    running: bool  # our process is alive
    healthy: bool  # it answers its health endpoint
    note: str = ""

    @property
    def state(self) -> str:
        if self.running:
            return "healthy" if self.healthy else "starting/unhealthy"
        return f"stopped ({self.note})" if self.note else "stopped"


# ---------------------------------------------------------------------------------------------- state
def default_state_dir() -> Path:
    return Path(os.environ.get("INSTAFLOW_STACK_DIR") or "~/.instaflow/stack").expanduser()


def resolve_state_dir(state_dir: Path | str | None = None) -> Path:
    """The absolute state folder: the one given, else $INSTAFLOW_STACK_DIR, else ~/.instaflow/stack."""
    return Path(state_dir).expanduser().resolve() if state_dir else default_state_dir().resolve()


def load_state(state_dir: Path | str | None = None) -> dict[str, Any] | None:
    path = resolve_state_dir(state_dir) / "stack.json"
    return json.loads(path.read_text()) if path.exists() else None


def _require_state(state_dir: Path | str | None) -> dict[str, Any]:
    state = load_state(state_dir)
    if state is None:
        raise StackError(f"no local stack in {resolve_state_dir(state_dir)}: run `instaflow stack up` first")
    return state


def _save_state(d: Path, state: dict[str, Any]) -> None:
    (d / "stack.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def credentials_path(state_dir: Path | str | None = None) -> Path:
    return resolve_state_dir(state_dir) / "credentials.env"


def credentials(state_dir: Path | str | None = None) -> tuple[str, str]:
    """(access key, secret key) of the stack's S3, read from the 0600 credentials file."""
    path = credentials_path(state_dir)
    if not path.exists():
        raise StackError(f"no S3 credentials at {path}: run `instaflow stack up` first")
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip().removeprefix("export ").strip()
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            values[k.strip()] = v.strip().strip("'\"")
    try:
        return values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"]
    except KeyError as err:
        raise StackError(f"{path} lacks AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from err


def _ensure_credentials(d: Path) -> tuple[str, str]:
    path = credentials_path(d)
    if path.exists():
        return credentials(d)
    key, secret = "instaflow" + secrets.token_hex(6), secrets.token_urlsafe(30)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# S3 keys of the local instaflow stack. Load them with: . {path}\n")
        f.write(f"export AWS_ACCESS_KEY_ID={key}\nexport AWS_SECRET_ACCESS_KEY={secret}\n")
    return key, secret


def _pid_file(d: Path, name: str) -> Path:
    return d / f"{name}.pid"


def _log_file(d: Path, name: str) -> Path:
    return d / "logs" / f"{name}.log"


def _read_pid(d: Path, name: str) -> int | None:
    try:
        return int(_pid_file(d, name).read_text().strip())
    except (OSError, ValueError):
        return None


def _ours(name: str, pid: int | None) -> bool:
    if not pid_alive(pid):
        return False
    cmd = pid_cmdline(pid)  # type: ignore[arg-type]
    return not cmd or all(m in cmd for m in CMD_MARKERS[name])


def _url(name: str, port: int) -> str:
    return f"http://{LOOPBACK}:{port}"


def _health_url(name: str, port: int) -> str:
    return _url(name, port) + HEALTH_PATHS[name]


def _bin(name: str) -> str:
    """A console script of this environment (prefect, mlflow), so the stack runs the versions we test."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    import shutil

    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH: pip install {name}")
    return found


# ---------------------------------------------------------------------------------------------- commands
def _spawn(d: Path, name: str, cmd: list[str], env: dict[str, str]) -> int:
    log = _log_file(d, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=d,
            env=env,
            start_new_session=True,
        )
    _pid_file(d, name).write_text(str(proc.pid))
    return proc.pid


def _base_env() -> dict[str, str]:
    env = os.environ.copy()
    # The servers must not inherit a client's pointers at some other API / store.
    for k in ("PREFECT_API_URL", "PREFECT_API_KEY", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    env.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _prefect_cmd(d: Path, port: int) -> tuple[list[str], dict[str, str]]:
    home = d / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    env = _base_env()
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        # the UI must query this server's port, not Prefect's default 4200
        PREFECT_UI_API_URL=f"http://{LOOPBACK}:{port}/api",
        PREFECT_SERVER_API_HOST=LOOPBACK,
        PREFECT_SERVER_API_PORT=str(port),
    )
    return [_bin("prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port)], env


def _mlflow_cmd(
    d: Path, port: int, s3_endpoint: str, bucket: str, key: str, secret: str
) -> tuple[list[str], dict[str, str]]:
    env = _base_env()
    env.update(
        MLFLOW_S3_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID=key,
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_DEFAULT_REGION=REGION,
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # otherwise ~10 job processes, 2.4 GB
    )
    cmd = [
        _bin("mlflow"),
        "server",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{d / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{bucket}/mlflow",
    ]
    return cmd, env


# ---------------------------------------------------------------------------------------------- up
def up(
    state_dir: Path | str | None = None,
    *,
    s3_port: int | None = None,
    prefect_port: int | None = None,
    mlflow_port: int | None = None,
    bucket: str | None = None,
    timeout: float = 180.0,
    echo: Callable[[str], None] = print,
) -> list[ServiceStatus]:
    """Start whatever is not already running (S3 first: MLflow stores its artifacts there); wait for health.

    Ports: the ones given, else the ones this state folder used last, else the defaults (8333, 4200, 5000).
    """
    d = resolve_state_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    old = load_state(d) or {}
    asked = {"s3": s3_port, "prefect": prefect_port, "mlflow": mlflow_port}
    ports = {n: int(asked[n] or old.get("ports", {}).get(n) or DEFAULT_PORTS[n]) for n in SERVICES}
    bucket = bucket or old.get("bucket") or DEFAULT_BUCKET
    running = {n: _ours(n, _read_pid(d, n)) for n in SERVICES}
    for n in SERVICES:
        old_port = old.get("ports", {}).get(n)
        if running[n] and old_port and old_port != ports[n]:
            raise StackError(
                f"{n} already runs on port {old_port}: run `instaflow stack down` before changing its port"
            )
        if not running[n]:
            _pid_file(d, n).unlink(missing_ok=True)  # stale
            if port_in_use(ports[n]):
                raise StackError(
                    f"port {ports[n]} ({LABELS[n]}) is in use by another program, not this stack: "
                    f"stop it or pass --{n}-port"
                )
    key, secret = _ensure_credentials(d)
    state = {"ports": ports, "bucket": bucket, "region": REGION, "weed_ports": old.get("weed_ports", {})}
    _save_state(d, state)

    # S3
    s3_url = _url("s3", ports["s3"])
    if running["s3"]:
        echo(f"s3: already running (pid {_read_pid(d, 's3')})")
        _wait_healthy(d, "s3", ports["s3"], timeout)
    else:
        echo(f"s3: starting SeaweedFS on {s3_url}")
        weed_ports = seaweed.pick_ports(ports["s3"], previous=state["weed_ports"])
        _log_file(d, "s3").parent.mkdir(parents=True, exist_ok=True)
        server = seaweed.start(
            d / "s3",
            access_key=key,
            secret_key=secret,
            bucket=None,
            ports=weed_ports,
            log_path=_log_file(d, "s3"),
            timeout=min(timeout, 60.0),
            region=REGION,
        )
        _pid_file(d, "s3").write_text(str(server.pid))
        state["weed_ports"] = dict(vars(weed_ports))
        _save_state(d, state)
    seaweed.create_bucket(s3_url, bucket, key, secret, REGION)

    # Prefect and MLflow start together (each takes ~10 s to import and migrate its database).
    for n in ("prefect", "mlflow"):
        if running[n]:
            echo(f"{n}: already running (pid {_read_pid(d, n)})")
            continue
        if n == "prefect":
            cmd, env = _prefect_cmd(d, ports[n])
        else:
            cmd, env = _mlflow_cmd(d, ports[n], s3_url, bucket, key, secret)
        echo(f"{n}: starting on {_url(n, ports[n])}")
        _spawn(d, n, cmd, env)
    for n in ("prefect", "mlflow"):
        _wait_healthy(d, n, ports[n], timeout)
    return status(d)


def _wait_healthy(d: Path, name: str, port: int, timeout: float) -> None:
    pid = _read_pid(d, name)
    ok = wait_until(
        lambda: http_ok(_health_url(name, port)), timeout, alive=lambda: pid_alive(pid), interval=0.5
    )
    if not ok:
        why = "exited" if not pid_alive(pid) else f"did not become healthy within {timeout:.0f}s"
        log = _log_file(d, name)
        raise StackError(f"{LABELS[name]} {why} (pid {pid}); see {log}:\n{log_tail(log)}")


# ---------------------------------------------------------------------------------------------- down/status
def down(
    state_dir: Path | str | None = None, *, timeout: float = 20.0, echo: Callable[[str], None] = print
) -> list[str]:
    """Stop every service of this state folder by pid (SIGTERM, SIGKILL after `timeout`); returns those stopped."""
    d = resolve_state_dir(state_dir)
    targets = {}
    for n in reversed(SERVICES):
        pid = _read_pid(d, n)
        if pid is not None and _ours(n, pid):
            echo(f"{n}: stopping pid {pid}")
            targets[n] = pid
    # All at once: each takes a few seconds to shut down gracefully.
    stop_pids(list(targets.values()), timeout=timeout)
    weed_ports = (load_state(d) or {}).get("weed_ports")
    if "s3" in targets and weed_ports:
        seaweed.remove_sockets(seaweed.SeaweedPorts(**weed_ports))
    for n in SERVICES:
        _pid_file(d, n).unlink(missing_ok=True)
    if not targets:
        echo(f"nothing running in {d}")
    return list(targets)


def status(state_dir: Path | str | None = None) -> list[ServiceStatus]:
    """Each service's URL, pid, liveness and health (ports from the state folder, else the defaults)."""
    d = resolve_state_dir(state_dir)
    ports = {**DEFAULT_PORTS, **((load_state(d) or {}).get("ports") or {})}
    out = []
    for n in SERVICES:
        pid = _read_pid(d, n)
        running = _ours(n, pid)
        healthy = running and http_ok(_health_url(n, ports[n]))
        note = "" if running else ("port taken by another program" if port_in_use(ports[n]) else "")
        out.append(
            ServiceStatus(n, _url(n, ports[n]), ports[n], pid if running else None, running, healthy, note)
        )
    return out


def env(state_dir: Path | str | None = None) -> dict[str, str]:
    """Environment variables that point clients (tests, the rebuild, shells) at this stack, keys included."""
    d = resolve_state_dir(state_dir)
    state = _require_state(d)
    ports, bucket = state["ports"], state["bucket"]
    key, secret = credentials(d)
    s3 = _url("s3", ports["s3"])
    return {
        "PREFECT_API_URL": _url("prefect", ports["prefect"]) + "/api",
        "MLFLOW_TRACKING_URI": _url("mlflow", ports["mlflow"]),
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": state.get("region", REGION),
        "INSTAFLOW_S3_ENDPOINT": s3,
        "INSTAFLOW_S3_BUCKET": bucket,
    }


def storage_overrides(state_dir: Path | str | None = None, prefix: str = "runs") -> list[str]:
    """`--set` overrides that put a run's storage on the stack's S3 (keys come from AWS_* env vars)."""
    e = env(state_dir)
    return [
        f"storage.root=s3://{e['INSTAFLOW_S3_BUCKET']}/{prefix}",
        f"storage.s3_endpoint={e['INSTAFLOW_S3_ENDPOINT']}",
    ]


def export_lines(state_dir: Path | str | None = None) -> list[str]:
    """Shell lines a user pastes (or evals) to use the stack; the secret stays in the credentials file."""
    e = env(state_dir)
    lines = [
        f"export {k}={e[k]}"
        for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    ]
    lines.append(f". {credentials_path(state_dir)}  # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    return lines
