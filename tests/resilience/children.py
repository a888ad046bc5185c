"""Processes to SIGKILL: forked from a forkserver that imported the whole stack once.

A fresh `python -c` child imports torch, diffusers, Prefect, Lance and MLflow again (~9 s idle, 30 s+ on a
busy machine): a suite that kills a dozen runs would spend minutes importing. The forkserver imports them
once, before any thread exists, and forks each child from there (~0.3 s). A child gets the Prefect API of the
test session, writes its output to a log file and runs one flow; the test kills it when it likes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any

PRELOAD = [
    "flows.rebuild",
    "flows.cli.main",
    "tasks.training",
    "tasks.generation",
    "instaflow_core.store",
    "tests.resilience.children",
]
_CTX: Any = None


def context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def _child(kind: str, cfg_json: str, refs_json: str, api_url: str, log_path: str) -> None:
    """Runs in the child: one flow of `kind` on the config and references given as JSON."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.environ["PREFECT_API_URL"] = api_url
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from instaflow_core.config import InstaflowConfig
    from instaflow_core.refs import ModelRef, TableRef
    from tasks.caching import prefect_settings

    torch.set_num_threads(1)
    import logging

    logging.getLogger("prefect").setLevel(logging.INFO)  # "Beginning flow run ...": the test reads the stage
    cfg = InstaflowConfig.model_validate_json(cfg_json)
    refs = json.loads(refs_json)
    with (
        temporary_settings(updates={PREFECT_API_URL: api_url}),
        prefect_settings(cfg.storage, cfg.orchestration),
    ):
        if kind == "rebuild":
            from flows.rebuild import rebuild_flow

            rebuild_flow(cfg)  # records its refs in the store (finish_rebuild), as the CLI's rebuild does
        elif kind == "generate":
            from flows.generate import generate_flow

            generate_flow(cfg, TableRef(**refs["prompts"]), ModelRef(**refs["teacher"]))
        elif kind == "reflow":
            from flows.reflow import reflow_flow

            reflow_flow(cfg, TableRef(**refs["triplets"]), ModelRef(**refs["teacher"]))
        elif kind == "distill":
            from flows.distill import distill_flow

            distill_flow(cfg, ModelRef(**refs["2rf"]), TableRef(**refs["prompts"]))
        else:
            raise ValueError(kind)
    print("CHILD DONE", flush=True)


def _cli_child(args: list[str], env: dict[str, str], out_path: str, err_path: str) -> None:
    """Runs in the child: `instaflow ARGS` exactly as the console script does (flows.cli.main.main)."""
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.update(env)
    sys.argv = ["instaflow", *args]
    from flows.cli.main import main

    main()


def run_cli(args: list[str], env: dict[str, str], folder: Path, timeout: float = 600) -> Any:
    """`instaflow ARGS` in a forked child -> an object with returncode, stdout, stderr (like subprocess.run).

    The same entry point as the console script, in a fresh process, without paying the imports again."""
    import types

    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob("*.out")))
    out, err = folder / f"{n}.out", folder / f"{n}.err"
    proc = context().Process(target=_cli_child, args=(args, env, str(out), str(err)))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return types.SimpleNamespace(returncode=proc.exitcode, stdout=out.read_text(), stderr=err.read_text())


def start(kind: str, cfg: Any, refs: dict[str, Any], log_path: Path) -> Any:
    """Start a child running one flow; returns the multiprocessing Process (kill it with os.kill(p.pid, 9))."""
    from prefect.settings import PREFECT_API_URL

    payload = json.dumps({k: v.model_dump(mode="json") for k, v in refs.items()})
    proc = context().Process(
        target=_child,
        args=(kind, cfg.model_dump_json(), payload, str(PREFECT_API_URL.value()), str(log_path)),
        daemon=False,
    )
    proc.start()
    return proc


def shutdown() -> None:
    """Stop the forkserver (multiprocessing would at exit too; the suite does it when it is done)."""
    global _CTX
    if _CTX is None:
        return
    from multiprocessing import forkserver

    server = forkserver._forkserver  # noqa: SLF001 - the only handle on the server process
    pid = getattr(server, "_forkserver_pid", None)
    if pid:
        import signal

        try:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        server._forkserver_pid = None  # noqa: SLF001
        server._forkserver_address = None  # noqa: SLF001
    _CTX = None
