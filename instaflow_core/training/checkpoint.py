"""Training checkpoints on any fsspec URI: written atomically by the main process, found again on resume.

Layout under `ckpt_dir` (a local path, file:// or s3:// URI):

    step-000000005/model.safetensors      live weights (safetensors)
                   ema.safetensors        EMA weights
                   optimizer.pt           optimizer state dict (torch.save, loaded with weights_only=True)
                   scheduler.pt           LR scheduler state dict
                   rng.pt                 per-rank RNG states (python, numpy, torch, cuda), gathered to rank 0
                   state.json             global step, stage, history ... written LAST in the folder
    latest                                "step-000000005", written after the folder is complete

Local folders are staged under a hidden temporary name and renamed into place; on object stores (no rename)
the `latest` pointer written last is what makes a checkpoint visible, so a crash mid-write leaves the
previous checkpoint in charge. Resuming reads only what `latest` names.

FSDP (sharded) training writes the same files with the same contents: the processes gather the full tensors
to the main process (`gather_model_state`, `gather_optimizer_state`), which writes them as above; on resume
the main process reads them and every process takes its own shards (`scatter_*`). The optimizer state keeps
the index-keyed layout of `optimizer.state_dict()`, so a checkpoint does not depend on how it was sharded:
it resumes with or without FSDP, on any number of processes (the RNG streams only with the same number).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from instaflow_core.errors import StorageError, TrainingError

log = logging.getLogger("instaflow.training")

LATEST = "latest"
STATE = "state.json"


def step_name(step: int) -> str:
    return f"step-{step:09d}"


# ------------------------------------------------------------------------------------------ (de)serialise
def tensors_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (CPU, contiguous; tensors sharing memory are cloned)."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach().to("cpu").contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), v.numel()) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        out[k] = v
    return st_save(out)


def tensors_from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    return st_load(blob)


def obj_to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def obj_from_bytes(blob: bytes) -> Any:
    # Our own files, but loaded the safe way anyway: state dicts are tensors, numbers, strings and lists.
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states in a form torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------ sharded models (FSDP2)
def _full_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded model on the main process's CPU, {} on the others (a collective:
    every process calls it; tensors are gathered one at a time)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def scatter_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict given on the main process ({} on the others) into a sharded model: rank 0
    broadcasts tensor by tensor and every process keeps its slice (a collective)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options(broadcast_from_rank0=True))


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state of a sharded model on the main process's CPU ({} on the others), in the
    layout of `optimizer.state_dict()`: parameters numbered in param-group order (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not state:
        return {}
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [index.setdefault(fqn, len(index)) for fqn in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[fqn]: v for fqn, v in state["state"].items()}, "param_groups": groups}


def scatter_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load an index-keyed full optimizer state given on the main process ({} on the others) into the
    optimizer of a sharded model (a collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    if state:  # parameter numbers -> the names torch's API keys the state by, in the same order
        local = get_optimizer_state_dict(model, optimizer, options=StateDictOptions())  # no communication
        names = [fqn for group in local["param_groups"] for fqn in group["params"]]
        state = {
            "state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
        }
    kinds = [{k: type(v) for k, v in g.items()} for g in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, state, options=_full_options(broadcast_from_rank0=True))
    for group, kind in zip(optimizer.param_groups, kinds, strict=True):  # the broadcast makes tuples lists
        for k, v in group.items():
            if kind.get(k) is tuple and isinstance(v, list):
                group[k] = tuple(v)


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The full (global) shape of every tensor in `model`'s state dict, sharded or not."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def model_mismatch(want: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> str | None:
    """Why a full state dict does not fit a model of these `state_shapes`, or None."""
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        return f"missing keys {missing[:3]}, unexpected keys {extra[:3]}"
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            return f"{k} has shape {tuple(state[k].shape)} in the checkpoint, {shape} in the model"
    return None


def optimizer_mismatch(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> str | None:
    """Why an index-keyed optimizer state does not fit `optimizer` (compared by global shapes), or None."""
    groups = state.get("param_groups", [])
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        return "the optimizer's parameter groups differ from the checkpoint's"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, entry in state.get("state", {}).items():
        if not 0 <= int(i) < len(params):
            return f"optimizer state for parameter {i}, the optimizer has {len(params)}"
        for k, v in entry.items():
            want = tuple(params[int(i)].shape)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != want:
                return (
                    f"optimizer state {k} of parameter {i} has shape {tuple(v.shape)}, the parameter {want}"
                )
    return None


# ------------------------------------------------------------------------------------------------ I/O
@dataclass
class Loaded:
    """A checkpoint read back: `files` maps file name to bytes, `state` is state.json."""

    uri: str
    state: dict[str, Any]
    files: dict[str, bytes]


class Checkpointer:
    """Writes and finds checkpoints under one URI. `fs` comes from the Store when given and the URI is of
    the store's kind (its credentials and endpoint), else from fsspec's defaults for the URI's scheme."""

    def __init__(self, ckpt_dir: str, store: Any = None, keep: int | None = None) -> None:
        self.uri = ckpt_dir.rstrip("/")
        scheme = self.uri.split("://", 1)[0] if "://" in self.uri else "file"
        protocols = getattr(store.fs, "protocol", ()) if store is not None else ()
        protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
        if scheme in protocols:  # the store's client: its endpoint and credentials
            self.fs = store.fs
        else:  # e.g. a local ckpt_dir next to an S3 store
            self.fs, _ = fsspec.core.url_to_fs(self.uri)
        self.root = self.fs._strip_protocol(self.uri)
        self.keep = keep
        self.local = isinstance(self.fs, LocalFileSystem)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def step_uri(self, step: int) -> str:
        return f"{self.uri}/{step_name(step)}"

    # -------------------------------------------------------------------------------------- read
    def latest(self) -> str | None:
        """The name of the newest complete checkpoint (e.g. step-000000005), or None."""
        try:
            if not self.fs.exists(self._path(LATEST)):
                return None
            return self.fs.cat_file(self._path(LATEST)).decode().strip() or None
        except OSError as err:
            raise StorageError(f"cannot read checkpoints under {self.uri}: {err}") from err

    def load(self, name: str, files: tuple[str, ...]) -> Loaded:
        folder = self._path(name)
        try:
            state = json.loads(self.fs.cat_file(f"{folder}/{STATE}"))
            blobs = {f: self.fs.cat_file(f"{folder}/{f}") for f in files}
        except FileNotFoundError as err:
            raise TrainingError(
                f"checkpoint {self.uri}/{name} named by {self.uri}/{LATEST} is incomplete ({err}); "
                f"delete {LATEST} to start over or point it at an older step"
            ) from err
        return Loaded(uri=f"{self.uri}/{name}", state=state, files=blobs)

    # -------------------------------------------------------------------------------------- write
    def save(self, step: int, files: dict[str, bytes], state: dict[str, Any]) -> str:
        """Write one checkpoint (call on the main process only); returns its URI."""
        name = step_name(step)
        payload = {**files, STATE: json.dumps(state, indent=1).encode()}  # state.json last
        try:
            if self.local:
                self._save_local(name, payload)
            else:
                folder = self._path(name)
                for fname, blob in payload.items():
                    self.fs.pipe_file(f"{folder}/{fname}", blob)
                self.fs.pipe_file(self._path(LATEST), name.encode())
        except OSError as err:
            raise StorageError(f"cannot write checkpoint {self.uri}/{name}: {err}") from err
        self._prune(name)
        return f"{self.uri}/{name}"

    def _save_local(self, name: str, payload: dict[str, bytes]) -> None:
        os.makedirs(self.root, exist_ok=True)
        tmp = os.path.join(self.root, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        for fname, blob in payload.items():
            with open(os.path.join(tmp, fname), "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
        final = os.path.join(self.root, name)
        if os.path.exists(final):  # the same step saved again (e.g. a re-run that finished): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = os.path.join(self.root, f".{LATEST}-{uuid.uuid4().hex[:8]}")
        with open(pointer, "w") as fh:
            fh.write(name)
        os.replace(pointer, os.path.join(self.root, LATEST))

    def _prune(self, newest: str) -> None:
        """Keep the newest `keep` checkpoints; never the one `latest` names."""
        if not self.keep:
            return
        try:
            names = sorted(
                p.rstrip("/").rsplit("/", 1)[-1]
                for p in self.fs.ls(self.root, detail=False)
                if p.rstrip("/").rsplit("/", 1)[-1].startswith("step-")
            )
        except OSError:
            return
        for old in names[: max(0, len(names) - self.keep)]:
            if old == newest:
                continue
            try:
                self.fs.rm(self._path(old), recursive=True)
                log.info("removed old checkpoint %s/%s", self.uri, old)
            except FileNotFoundError:
                # already empty: object stores with a filer (SeaweedFS) keep listing an emptied "folder"
                pass
            except OSError as err:  # pruning is housekeeping: never fail a training run over it
                log.warning("could not remove old checkpoint %s/%s: %s", self.uri, old, err)
