"""Task retries for transient store and tracking failures: an S3 or MLflow outage of minutes does not kill a run.

Every task that touches the store or the registry is decorated with `**STORE_RETRIES`: Prefect re-runs it after
an exponential backoff with jitter (1, 2, 4, 8, 16, then every 30 s), but only while `retry_transient` says
the failure is transient (connection refused/reset, timeouts, HTTP 5xx, SlowDown throttling, Lance IO errors
on S3, a retryable commit conflict, MLflow unreachable) and the retry window (`orchestration.retry_window_s`,
counted from the task run's first failure) is not used up. Each retry logs one warning line; a user mistake
(wrong key, missing file, bad data) is never retried. A re-run task resumes: shards skip the triplets already
committed, training starts from its last checkpoint.

When the window is spent the task fails with its error, and the CLI says the run can be resumed (`resume_hint`).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from instaflow_core.config import OrchestrationConfig
from tasks.artifacts import run_logger
from tasks.caching import WINDOW_ENV

DELAYS_S = [1, 2, 4, 8, 16, 30]  # Prefect repeats the last delay
MAX_ATTEMPTS = 500  # the window, not this count, ends the retries

_first_failure: dict[str, float] = {}
_lock = threading.Lock()
# (task run name, error line, attempt) of every retry taken in this process: tests and the fault suite read it
RETRIES: list[tuple[str, str, int]] = []


def window_s() -> float:
    """The retry window of the current run (the config default outside one)."""
    raw = os.environ.get(WINDOW_ENV)
    try:
        return float(raw) if raw else float(OrchestrationConfig.model_fields["retry_window_s"].default)
    except ValueError:
        return float(OrchestrationConfig.model_fields["retry_window_s"].default)


def _chain(err: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and all(err is not e for e in out):
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _transient_one(err: BaseException) -> bool:
    from instaflow_core.store.errors import is_transient_message

    name = type(err).__name__
    if getattr(err, "transient", False):  # e.g. tracking's unreachable-server error
        return True
    if isinstance(err, (ConnectionError, TimeoutError)):  # refused, reset, aborted, broken pipe, timeouts
        return True
    if name in (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientOSError",
        "ConnectError",
        "ReadTimeout",
        "ConnectTimeout",
        "RemoteDisconnected",
    ):
        return True
    response = getattr(err, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "ServiceUnavailable")
    if isinstance(err, (OSError, ValueError, RuntimeError)):  # Lance / object_store: text only
        return is_transient_message(f"{name}: {err}")
    return False


def is_unreachable(err: BaseException) -> bool:
    """True when `err`, or an exception it was raised from or while handling, is a failed connection.

    MLflow's REST client re-raises a requests ConnectionError as a plain MlflowException (no `from`), so the
    original is found on the exception's context chain, by type.
    """
    import requests  # only when classifying a failure: keeps the retry condition's import light

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        if isinstance(e, (requests.exceptions.ConnectionError, ConnectionError)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def is_transient(err: BaseException | None) -> bool:
    """Is `err` (or what it was raised from) an outage, timeout or throttling worth retrying?"""
    if err is None or isinstance(err, (KeyboardInterrupt, SystemExit)):
        return False
    if any(_transient_one(e) for e in _chain(err)):
        return True
    return is_unreachable(err)


def describe(err: BaseException) -> str:
    """The error's first line, short (the chain and the traceback are in the log file)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _exception(state: Any) -> BaseException | None:
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        res = state.result(raise_on_failure=False)
    except Exception as err:  # noqa: BLE001 - the result itself may re-raise
        return err
    return res if isinstance(res, BaseException) else None


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry transient failures until the window is spent; one log line each."""
    err = _exception(state)
    if not is_transient(err):
        return False
    assert err is not None
    now = time.monotonic()
    with _lock:
        first = _first_failure.setdefault(str(task_run.id), now)
    elapsed, window = now - first, window_s()
    attempt = int(getattr(task_run, "run_count", 0) or 0)
    log = run_logger("instaflow.retries")
    if elapsed >= window:
        log.warning(
            "%s: %s; still failing after %.0f s of retries (orchestration.retry_window_s=%g): giving up",
            task_run.name, describe(err), elapsed, window,
        )  # fmt: skip
        return False
    RETRIES.append((task_run.name, describe(err), attempt))
    log.warning(
        "%s: transient failure (%s); retrying (attempt %d; %.0f s of the %g s retry window left)",
        task_run.name, describe(err), attempt + 1, window - elapsed, window,
    )  # fmt: skip
    return True


# `@task(..., **STORE_RETRIES)` on every task that reads or writes the store or the registry.
STORE_RETRIES: dict[str, Any] = {
    "retries": MAX_ATTEMPTS,
    "retry_delay_seconds": DELAYS_S,
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient,
}


def resume_hint(argv: list[str] | None = None) -> str:
    """How to resume a run that gave up: the same command again (finished work is kept)."""
    import shlex
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["instaflow", *(shlex.quote(a) for a in args)]) if args else "instaflow rebuild"
    return (
        f"the run can be resumed: run `{command}` again once the service is back "
        "(finished shards, checkpoints and cached stages are kept)"
    )
