"""The per-process entry of a distributed training stage: `accelerate launch ... -m instaflow_core.training.entry job.json`.

The training task (`TrainJob.launch`) writes the stage's `TrainJob` as JSON and launches this module on every
process; each builds the same student and trains its shard of the data through `instaflow_core.training`.
The main process prints its log records, its evaluation points, its summary and any user-facing error as `INSTAFLOW_EVENT {json}`
lines on stdout, which the launching task relays to MLflow and Prefect. The job file may also be a store URI
(s3://...), so a cluster scheduler can start the same job on every node (infra/ACCELERATE.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from instaflow_core.errors import InstaflowError
from instaflow_core.training.job import EVENT_PREFIX


def _emit(event: dict[str, Any]) -> None:
    print(EVENT_PREFIX + json.dumps(event, default=str), flush=True)


def _read_job(source: str, storage_json: str | None) -> str:
    if source.startswith(("s3://", "file://")):
        from instaflow_core.config import StorageConfig
        from instaflow_core.store import Store

        storage = (
            StorageConfig.model_validate_json(storage_json) if storage_json else StorageConfig(root=source)
        )
        return Store(storage).read_bytes(source).decode()
    with open(source) as fh:
        return fh.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instaflow_core.training.entry", description=__doc__)
    parser.add_argument("job", help="TrainJob JSON: a local path or a store URI")
    parser.add_argument(
        "--no-validate", action="store_true", help="skip the input checks (the task did them)"
    )
    parser.add_argument("--storage", default=None, help="StorageConfig JSON to read a job from S3")
    args = parser.parse_args(argv)

    from instaflow_core.training.job import TrainJob
    from instaflow_core.training.setup import make_accelerator

    job = TrainJob.model_validate_json(_read_job(args.job, args.storage))
    try:
        acc = make_accelerator(job.section)
        summary = job.run(
            accelerator=acc,
            on_log=lambda r: _emit({"type": "log", "record": r}),
            on_eval=lambda r: _emit({"type": "eval", "record": r}),
            validate=not args.no_validate,
        )
    except InstaflowError as err:
        _emit({"type": "error", "class": type(err).__name__, "message": str(err)})
        return 1
    if acc.is_main_process:
        _emit({"type": "summary", "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
