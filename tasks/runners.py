"""Prefect task runners from the orchestration config: threads, processes, or a cluster."""

from __future__ import annotations

from typing import Any

from instaflow_core.config import OrchestrationConfig
from instaflow_core.errors import ConfigError


def make_task_runner(orchestration: OrchestrationConfig) -> Any:
    """orchestration.task_runner -> a Prefect task runner: threads (one process, one shared model; torch releases
    the GIL), a process pool (spawned workers, one model copy each) or a Dask cluster (prefect-dask)."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if orchestration.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=orchestration.max_workers)
    if orchestration.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise ConfigError(
                "orchestration.task_runner=dask needs the prefect-dask package: pip install prefect-dask "
                "(and dask-cuda for GPU workers); see infra/GPU_CLUSTER.md"
            ) from err
        if orchestration.dask_address:
            return DaskTaskRunner(address=orchestration.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": orchestration.max_workers, "threads_per_worker": 1}
        )
    return ThreadPoolTaskRunner(max_workers=orchestration.max_workers)
