"""Prefect task runners from the orchestration config: threads, processes (one machine), or a Ray cluster.

Ray (`orchestration.task_runner=ray`, prefect-ray's RayTaskRunner): every shard task becomes one Ray task with
the resources of `orchestration.ray_task_cpus` / `ray_task_gpus` (None = 1 GPU per task when the cluster has
GPUs, else none) and `max_calls=0`, so a worker process lives on between tasks and keeps its teacher in the
per-process model cache (Ray's default for GPU tasks is a fresh process per task: a model load per shard).
`max_retries` re-runs a task whose worker process died (same Prefect task run; the shard's lease and the
declared key make the re-run safe). `orchestration.ray_address`: None starts a private local instance of
`max_workers` CPUs for this process (kept for the next stage, shut down at exit); `auto` joins the cluster this
machine belongs to; `host:6379` or `ray://host:10001` connects to one.

Workers report to the driver's Prefect API: a real server (`instaflow stack up`, $PREFECT_API_URL), or on one
machine the embedded one (its URL is handed to the tasks; without it each worker would start its own).
Credentials are never put into Ray's runtime_env (Ray stores it in plain text): cluster nodes need their own
(environment of `ray start`, instance roles); a local instance inherits this process's environment.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from typing import Any

from instaflow_core.config import OrchestrationConfig
from instaflow_core.errors import ConfigError

logger = logging.getLogger("instaflow.tasks.runners")
_RAY: dict[str, Any] = {}  # what this process's Ray connection was made for


def make_task_runner(orchestration: OrchestrationConfig) -> Any:
    """orchestration.task_runner -> a Prefect task runner: threads (one process, one shared model; torch releases
    the GIL), a process pool (spawned workers, one model copy each) or Ray (a worker per CPU/GPU slot)."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if orchestration.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=orchestration.max_workers)
    if orchestration.task_runner == "ray":
        return ray_task_runner(orchestration)
    return ThreadPoolTaskRunner(max_workers=orchestration.max_workers)


def fans_out(orchestration: OrchestrationConfig) -> bool:
    """Whether independent heavy tasks (evaluation of several models) should run side by side: on a Ray
    cluster each gets its own worker (and GPU); on one machine they would only share it and skew latencies."""
    return orchestration.task_runner == "ray"


# ------------------------------------------------------------------------------------------------ ray
def connect_ray(orchestration: OrchestrationConfig) -> dict[str, Any]:
    """Connect this process to Ray once (a later stage reuses the connection); returns the cluster's resources."""
    try:
        import ray
    except ImportError as err:  # pragma: no cover - ray is a dependency
        raise ConfigError(
            "orchestration.task_runner=ray needs the ray package: pip install 'ray[default]'"
        ) from err
    address = orchestration.ray_address or "local"
    want = {"address": address, "cpus": orchestration.max_workers if address == "local" else None}
    if ray.is_initialized() and _RAY.get("want") != want:
        ray.shutdown()  # connected elsewhere (another config in this process)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "address": address,
            "namespace": "instaflow",
            "log_to_driver": True,
            "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": _env("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}},
        }  # fmt: skip
        if address == "local":  # a private instance: never joins a cluster some other user started here
            kwargs |= {"num_cpus": orchestration.max_workers, "include_dashboard": False}
        _init_with_retries(ray, kwargs, address)
        _RAY["want"] = want
        atexit.register(_shutdown)
        res = ray.cluster_resources()
        logger.info(
            "Ray: %s, %d nodes, %s CPUs, %s GPUs", address, len([n for n in ray.nodes() if n.get("Alive")]),
            res.get("CPU", 0), res.get("GPU", 0),
        )  # fmt: skip
    return dict(ray.cluster_resources())


# A Ray client connection (`ray://`) starts a dedicated server process on the head for each client; that start
# can fail transiently (Ray's proxier reports "Initialization failure from server" when the process exits while
# it is being watched, seen on a loaded 2-core machine). Each retry gets a fresh server on another port. Nothing
# listening at the address is a different error (ConnectionError after Ray's own timeout) and is not retried.
_CLIENT_INIT_ATTEMPTS = 3
_CLIENT_INIT_BACKOFF_S = 2.0


def _init_with_retries(ray: Any, kwargs: dict[str, Any], address: str) -> None:
    import time

    for attempt in range(1, _CLIENT_INIT_ATTEMPTS + 1):
        try:
            ray.init(**kwargs)
            return
        except ConnectionAbortedError as err:  # the client server failed to start: transient
            with contextlib.suppress(Exception):
                ray.shutdown()  # drop the half-made client context before the next try
            if attempt == _CLIENT_INIT_ATTEMPTS:
                raise _cannot_connect(address, err) from err
            logger.warning(
                "Ray: %s refused the client session (attempt %d/%d: %s); retrying",
                address, attempt, _CLIENT_INIT_ATTEMPTS, _first_line(err),
            )  # fmt: skip
            time.sleep(_CLIENT_INIT_BACKOFF_S * attempt)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
            raise _cannot_connect(address, err) from err


def _first_line(err: BaseException) -> str:
    """One line of an error; Ray's client puts the server's whole traceback in the message: keep its head and
    its last line (the exception the server died of)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return ""
    text = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
    return text[:200]


def _cannot_connect(address: str, err: BaseException) -> ConfigError:
    return ConfigError(
        f"orchestration.ray_address={address!r}: cannot connect to a Ray cluster there "
        f"({type(err).__name__}: {_first_line(err)})"
    )


def _env(name: str, default: str) -> str:
    import os

    return os.environ.get(name, default)


def disconnect_ray() -> None:
    """Drop this process's Ray connection (a later `connect_ray` makes a fresh one); a no-op when not connected."""
    _RAY.pop("want", None)
    _shutdown()


def _shutdown() -> None:
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():
            ray.shutdown()


def task_options(orchestration: OrchestrationConfig, resources: dict[str, Any]) -> dict[str, Any]:
    """The `ray.remote` options of one shard / evaluation task."""
    gpus = orchestration.ray_task_gpus
    if gpus is None:
        gpus = 1 if resources.get("GPU", 0) >= 1 else 0
    opts: dict[str, Any] = {
        "num_cpus": orchestration.ray_task_cpus,
        "max_calls": 0,  # keep the worker (and its cached teacher) between tasks, GPU tasks too
        "max_retries": orchestration.ray_max_retries,
    }
    if gpus:
        opts["num_gpus"] = gpus
    return opts


def _api_url_for_workers() -> str | None:
    """The Prefect API the driver uses, as a URL the workers can reach (the embedded server's on one machine)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return str(url)
    try:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        if server.running:
            return server.api_url
    except Exception:  # noqa: BLE001 - no embedded server: the workers fall back to their own
        pass
    return None


def ray_task_runner(orchestration: OrchestrationConfig) -> Any:
    """A prefect-ray RayTaskRunner on this process's Ray connection, submitting with the shard resources."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    class ShardRayTaskRunner(RayTaskRunner):
        """RayTaskRunner whose tasks get the configured resources and the driver's Prefect API URL."""

        def __init__(self) -> None:
            super().__init__(address=orchestration.ray_address, init_kwargs={"namespace": "instaflow"})
            self.options: dict[str, Any] = {}
            self.api_url: str | None = None

        def duplicate(self) -> Any:
            return ray_task_runner(orchestration)

        def __enter__(self) -> Any:
            resources = connect_ray(orchestration)  # connected already: RayTaskRunner will not own/shut it
            self.options = task_options(orchestration, resources)
            self.api_url = _api_url_for_workers()
            host = (orchestration.ray_address or "local").removeprefix("ray://")
            remote = not host.startswith(("local", "127.", "localhost"))  # workers on other machines
            if remote and (self.api_url or "").startswith(("http://127.", "http://localhost")):
                logger.warning(
                    "Prefect API %s is on loopback: workers on other machines cannot report to it "
                    "(run a Prefect server and set PREFECT_API_URL)", self.api_url,
                )  # fmt: skip
            return super().__enter__()

        def submit(
            self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None
        ) -> Any:
            updates = {PREFECT_API_URL: self.api_url} if self.api_url else {}
            with remote_options(**self.options), temporary_settings(updates=updates):
                return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)

    return ShardRayTaskRunner()
