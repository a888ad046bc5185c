"""The training loop: stages -> optimizer steps -> micro-batches, with EMA, checkpoints and resume.

It knows nothing about where data comes from (a batch source, see data.py), what the loss is (a callable),
or how the run is tracked (an `on_log` callback): reflow and distillation of an SD UNet and the Gaussian
mixture toy run through this same function.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch import Tensor, nn

from instaflow_core.config import TrainConfig, stable_hash
from instaflow_core.errors import ConfigError, TrainingError
from instaflow_core.models.switches import switch_on
from instaflow_core.training.checkpoint import (
    Checkpointer,
    Loaded,
    capture_rng,
    gather_model_state,
    gather_optimizer_state,
    model_mismatch,
    obj_from_bytes,
    obj_to_bytes,
    optimizer_mismatch,
    restore_rng,
    scatter_model_state,
    scatter_optimizer_state,
    state_shapes,
    tensors_from_bytes,
    tensors_to_bytes,
)
from instaflow_core.training.data import BatchSource, BatchStream, to_device
from instaflow_core.training.ema import EMA, ShardedEMA, meta_copy
from instaflow_core.training.prefetch import DeviceFeed
from instaflow_core.training.setup import (
    StageSpan,
    apply_perf_switches,
    broadcast_module,
    build_optimizer,
    build_scheduler,
    is_fsdp,
    make_accelerator,
    plan_stages,
    resolve_fsdp_wrap,
)

log = logging.getLogger("instaflow.training")

LossFn = Callable[[nn.Module, dict], Tensor]
CKPT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")
BIG_FILES = CKPT_FILES[:3]  # under FSDP only the main process reads these; the others get shards from it


@dataclass
class TrainResult:
    """What a training run produced. `steps` is the global optimizer step reached (over all stages)."""

    steps: int
    final_loss: float | None
    checkpoint: str | None  # URI of the newest checkpoint folder
    history: list[dict] = field(default_factory=list)  # one record per log_every steps (see train)
    # the EMA weights; under FSDP a plain unsharded module on the main process's CPU, None on the others
    ema_model: nn.Module | None = None
    switches: dict[str, Any] = field(default_factory=dict)  # the speed switches as read back from the UNet


@dataclass
class _Parts:
    """Everything the loop drives, set up once by `train` (the loop does not build any of it)."""

    cfg: TrainConfig
    acc: Accelerator
    spans: list[StageSpan]
    base: nn.Module  # the raw module: state dicts, EMA, the caller's handle (under FSDP: sharded in place)
    wrapped: nn.Module  # what accelerate returned (DDP, compile): the one to call
    ema: EMA | ShardedEMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ckpt: Checkpointer
    fsdp: bool = False  # sharded (FSDP2): state dicts are gathered / scattered, all processes take part


@dataclass
class _Run:
    step: int = 0  # optimizer steps done
    history: list[dict] = field(default_factory=list)
    final_loss: float | None = None
    checkpoint: str | None = None


def train(
    model: nn.Module,
    batches: BatchSource,
    loss_fn: LossFn,
    cfg: TrainConfig,
    ckpt_dir: str,
    *,
    store: Any = None,
    accelerator: Accelerator | None = None,
    on_log: Callable[[dict], None] | None = None,
    stage_index: int | None = None,
) -> TrainResult:
    """Train `model` in place through `cfg.stages`, resuming from the latest checkpoint in `ckpt_dir`.

    batches: a factory `batches(BatchRequest) -> Iterable[dict]` or a plain iterable of micro-batch dicts
        (see instaflow_core.training.data); every micro-batch holds `micro_batch_size` rows for this process.
    loss_fn: `loss_fn(model, batch) -> scalar`. `batch["stage"]` is the current TrainStageConfig (its
        `.loss` picks l2 / pseudo_huber / lpips). `model` is the accelerate-wrapped module: call it, do not
        reach for its attributes (keep a reference to the raw module in the closure for that).
    ckpt_dir: local path or fsspec URI; written through `store.fs` when a Store is given.
    on_log: called on the main process every `log_every` steps with
        {step, stage, loss, lr, grad_norm, samples_per_s, data_wait_share}; `loss` is the mean over the steps
        since the previous record (over processes too), `lr` the last step's learning rate.
    stage_index: stop at the end of this stage (the earlier ones run first unless the checkpoint has them),
        so a schedule can be run one stage per call into the same ckpt_dir.

    The global python/numpy/torch RNGs are seeded with cfg.seed + rank at the start. Data order and RNG
    are restored on resume, so a run killed after checkpoint k and restarted reproduces
    the uninterrupted loss curve (given a deterministic batch source that uses its own generators).

    Under FSDP (`cfg.fsdp` or the launcher's FSDP settings, see setup.make_accelerator) `model` is sharded in
    place (FSDP2) and stays so; the EMA is sharded alike (ema.ShardedEMA); checkpoints hold full tensors in the
    usual files (checkpoint.py) and `TrainResult.ema_model` is the full EMA on the main process.
    """
    owns_accelerator = accelerator is None
    acc = accelerator or make_accelerator(cfg)
    fsdp = is_fsdp(acc)
    spans = plan_stages(cfg, acc.num_processes)
    last = _last_span(spans, stage_index)
    set_seed(cfg.seed, device_specific=True)  # seed + rank: ranks draw different t / noise

    switches = apply_perf_switches(model, cfg, acc.device)  # on the UNet, in place (compile too)
    if fsdp:
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in model.modules()):
            raise ConfigError("FSDP shards the model in place: give train a freshly built, unsharded module")
        blocks = resolve_fsdp_wrap(acc, model)
        log.info("FSDP2: sharding %s per %s", type(model).__name__, ", ".join(blocks) or "model (one unit)")
        broadcast_module(model, acc.device)  # rank 0's weights everywhere, as DDP's prepare does
        skeleton = meta_copy(model)  # the unsharded shape (no memory), for the EMA's shards and export
    else:
        ema = EMA(model, cfg.ema_decay)  # copied before accelerate patches forward for autocast
    optimizer = build_optimizer(model, cfg, acc.device)
    scheduler = build_scheduler(optimizer, cfg, spans)
    wrapped, optimizer = acc.prepare(model, optimizer)
    if fsdp:
        ema = ShardedEMA(skeleton, wrapped, cfg.ema_decay)  # this process's slices of the live weights
    else:
        ema.to(acc.device).copy_from(model)  # DDP broadcast rank 0's weights in prepare: the EMA starts there
    ckpt = Checkpointer(ckpt_dir, store, keep=cfg.keep_checkpoints)
    parts = _Parts(cfg, acc, spans, model, wrapped, ema, optimizer, scheduler, ckpt, fsdp)
    feed = None

    try:
        run, rng = _resume(parts)
        if run.step >= last.end:
            log.info("%s: already at step %d (target %d), nothing to do", ckpt_dir, run.step, last.end)
        else:
            stream = BatchStream(batches, spans, acc.process_index, acc.num_processes, cfg.seed)
            stream.seek(run.step)
            if rng is not None:
                restore_rng(rng)  # after seeking, so skipping data cannot disturb the restored streams
            # the pinned, prefetching loader (cfg.prefetch: on CUDA by default), started after the RNG restore
            depth = 2 if switch_on(cfg.prefetch, acc.device) else 0
            feed = DeviceFeed(stream, spans, run.step, last.end, acc.device, depth=depth)
            _loop(parts, run, last, feed, loss_fn, on_log)
        ema_model = ema.export() if isinstance(ema, ShardedEMA) else ema.model  # export: all processes
    finally:
        if feed is not None:
            feed.close()
        _unpatch(acc, wrapped, model)
        if owns_accelerator:
            acc.free_memory()
        elif fsdp:  # accelerate's FSDP gradient clipping looks the model up among all it prepared
            acc._models[:] = [m for m in acc._models if m is not wrapped]
    return TrainResult(
        steps=run.step,
        final_loss=run.final_loss,
        checkpoint=run.checkpoint,
        history=run.history,
        ema_model=ema_model,
        switches=switches,
    )


def _unpatch(acc: Accelerator, wrapped: nn.Module, model: nn.Module) -> None:
    """Hand the caller back a plain module: accelerate patched forward for autocast in prepare."""
    acc.unwrap_model(wrapped, keep_fp32_wrapper=False)  # restores the original forward (as an attribute)
    fwd = model.__dict__.get("forward")
    if getattr(fwd, "__func__", None) is type(model).forward:
        del model.__dict__["forward"]


def _last_span(spans: list[StageSpan], stage_index: int | None) -> StageSpan:
    if stage_index is None:
        return spans[-1]
    if not 0 <= stage_index < len(spans):
        raise ConfigError(f"stage_index {stage_index} out of range: the config has {len(spans)} stage(s)")
    return spans[stage_index]


def _span_at(spans: list[StageSpan], step: int) -> StageSpan:
    return next(s for s in spans if s.start <= step < s.end)


# ------------------------------------------------------------------------------------------------ the loop
def _loop(
    p: _Parts,
    run: _Run,
    last: StageSpan,
    stream: BatchStream | DeviceFeed,
    loss_fn: LossFn,
    on_log: Callable[[dict], None] | None,
) -> None:
    cfg, acc, wrapped, optimizer = p.cfg, p.acc, p.wrapped, p.optimizer
    device = acc.device
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
    window = _Window(time.perf_counter(), stream.wait_s)
    log.info("training from step %d to %d (%d process(es))", run.step, last.end, acc.num_processes)
    wrapped.train()
    while run.step < last.end:
        span = _span_at(p.spans, run.step)
        if run.step == span.start:
            log.info(
                "stage %d: steps %d-%d, batch %d = %d micro x %d accumulation x %d process(es), loss %s, lr %g",
                span.index, span.start + 1, span.end, span.stage.batch_size, span.micro_batch_size,
                span.accumulation, acc.num_processes, span.stage.loss, span.lr,
            )  # fmt: skip
        loss_sum = torch.zeros((), device=device)
        for micro in range(span.accumulation):
            batch = stream.next(span, run.step)
            batch = {**to_device(batch, device), "stage": span.stage}
            last_micro = micro == span.accumulation - 1
            # no gradient all-reduce until the last micro-batch of the step
            with contextlib.nullcontext() if last_micro else acc.no_sync(wrapped):
                with acc.autocast():
                    loss = loss_fn(wrapped, batch)
                acc.backward(loss / span.accumulation)
            loss_sum += loss.detach().float()
        step_loss = acc.reduce(loss_sum / span.accumulation, reduction="mean").item()  # same on every rank
        if not math.isfinite(step_loss):
            raise TrainingError(
                f"non-finite loss ({step_loss}) at step {run.step + 1} (stage {span.index}); "
                f"last good checkpoint: {run.checkpoint or 'none (nothing saved yet)'}"
            )
        grad_norm = float(acc.clip_grad_norm_(wrapped.parameters(), max_norm))
        if not math.isfinite(grad_norm) and acc.mixed_precision != "fp16":  # fp16's scaler skips such steps
            raise TrainingError(
                f"non-finite gradient norm at step {run.step + 1} (stage {span.index}); "
                f"last good checkpoint: {run.checkpoint or 'none (nothing saved yet)'}"
            )
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        p.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        p.ema.update(p.base)
        run.step += 1
        run.final_loss = step_loss
        window.add(step_loss, span.stage.batch_size)

        if run.step % cfg.log_every == 0 or run.step == last.end:
            record = window.record(run.step, span.index, lr, grad_norm, stream.wait_s)
            run.history.append(record)
            if acc.is_main_process:
                log.info(
                    "step %d loss %.5g lr %.3g grad_norm %.3g %.1f samples/s data wait %.0f%%",
                    run.step, record["loss"], lr, grad_norm, record["samples_per_s"],
                    100 * record["data_wait_share"],
                )  # fmt: skip
                if on_log is not None:
                    on_log(record)
            window = _Window(time.perf_counter(), stream.wait_s)
        if run.step % cfg.checkpoint_every == 0 or run.step == last.end:
            _save(p, run)


class _Window:
    """Loss, throughput and data-wait accumulated between two log records."""

    def __init__(self, t0: float, wait0: float) -> None:
        self.t0, self.wait0 = t0, wait0
        self.losses: list[float] = []
        self.samples = 0

    def add(self, loss: float, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    def record(self, step: int, stage: int, lr: float, grad_norm: float, wait_s: float) -> dict:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return {
            "step": step,
            "stage": stage,
            "loss": sum(self.losses) / len(self.losses),
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": self.samples / elapsed,
            "data_wait_share": min(1.0, (wait_s - self.wait0) / elapsed),
        }


# ------------------------------------------------------------------------------------------ checkpoints
def _save(p: _Parts, run: _Run) -> None:
    """Every rank hands its RNG state to rank 0, which alone writes; the others wait for it. Under FSDP every
    rank first takes part in gathering the full model, EMA and optimizer state to rank 0."""
    acc = p.acc
    rng = gather_object([capture_rng()]) if acc.num_processes > 1 else [capture_rng()]
    weights = _sharded_files(p) if p.fsdp else _plain_files(p) if acc.is_main_process else {}
    if acc.is_main_process:
        files = {
            **weights,
            "scheduler.pt": obj_to_bytes(p.scheduler.state_dict()),
            "rng.pt": obj_to_bytes(rng),
        }
        state = {
            "step": run.step,
            "final_loss": run.final_loss,
            "world_size": acc.num_processes,
            "config_hash": stable_hash(p.cfg.model_dump(mode="json")),
            "history": run.history,
            "time": time.time(),
        }
        if p.fsdp:
            state["fsdp"] = True  # written by sharded processes; the files hold full tensors all the same
        uri = p.ckpt.save(run.step, files, state)
        log.info("checkpoint %s", uri)
    acc.wait_for_everyone()
    run.checkpoint = p.ckpt.step_uri(run.step)


def _plain_files(p: _Parts) -> dict[str, bytes]:
    return {
        "model.safetensors": tensors_to_bytes(p.base.state_dict()),
        "ema.safetensors": tensors_to_bytes(p.ema.state_dict()),
        "optimizer.pt": obj_to_bytes(p.optimizer.state_dict()),
    }


def _sharded_files(p: _Parts) -> dict[str, bytes]:
    """The same three files from a sharded model (collectives: every rank calls this; the bytes exist on
    rank 0 only). One state dict is gathered at a time and dropped once serialised."""
    files = {}
    for name, gather in (
        ("model.safetensors", lambda: gather_model_state(p.wrapped)),
        ("ema.safetensors", p.ema.state_dict),
        ("optimizer.pt", lambda: gather_optimizer_state(p.wrapped, p.optimizer.optimizer)),
    ):
        state = gather()
        if p.acc.is_main_process:
            files[name] = obj_to_bytes(state) if name.endswith(".pt") else tensors_to_bytes(state)
        del state
    return files


def _resume(p: _Parts) -> tuple[_Run, dict | None]:
    """Load the latest checkpoint, if any, into model / EMA / optimizer / scheduler; return this rank's RNG."""
    acc = p.acc
    name = p.ckpt.latest()
    if name is None:
        log.info("no checkpoint in %s: starting at step 0", p.ckpt.uri)
        return _Run(), None
    reads_all = not p.fsdp or acc.is_main_process
    loaded = p.ckpt.load(name, CKPT_FILES if reads_all else tuple(set(CKPT_FILES) - set(BIG_FILES)))
    if p.fsdp:
        _load_sharded(p, loaded)
    else:
        try:
            p.base.load_state_dict(tensors_from_bytes(loaded.files["model.safetensors"]))
            p.ema.load_state_dict(tensors_from_bytes(loaded.files["ema.safetensors"]))
            p.optimizer.load_state_dict(obj_from_bytes(loaded.files["optimizer.pt"]))
        except (RuntimeError, ValueError, KeyError) as err:
            raise _misfit(loaded, _first_line(err)) from err
    try:
        p.scheduler.load_state_dict(obj_from_bytes(loaded.files["scheduler.pt"]))
    except (RuntimeError, ValueError, KeyError) as err:
        raise _misfit(loaded, _first_line(err)) from err
    st = loaded.state
    run = _Run(step=int(st["step"]), history=list(st.get("history", [])), final_loss=st.get("final_loss"))
    run.checkpoint = loaded.uri
    rngs = obj_from_bytes(loaded.files["rng.pt"])
    rng = rngs[acc.process_index] if len(rngs) == acc.num_processes else None
    if rng is None:
        log.warning(
            "checkpoint was written by %d process(es), now %d: RNG streams restart from the seed",
            len(rngs),
            acc.num_processes,
        )
    log.info("resumed from %s at step %d", loaded.uri, run.step)
    return run, rng


def _load_sharded(p: _Parts, loaded: Loaded) -> None:
    """Rank 0 reads and checks the full state dicts, then every rank takes its shards from it. The verdict of
    the check is shared first, so a checkpoint that does not fit fails on every rank alike (no rank is left
    waiting in a broadcast the others never join)."""
    model_sd, ema_sd, optim_sd, problem = {}, {}, {}, None
    want = state_shapes(p.wrapped)  # global shapes, on every rank (no communication)
    if p.acc.is_main_process:
        try:
            model_sd = tensors_from_bytes(loaded.files["model.safetensors"])
            ema_sd = tensors_from_bytes(loaded.files["ema.safetensors"])
            optim_sd = obj_from_bytes(loaded.files["optimizer.pt"])
            problem = (
                model_mismatch(want, model_sd)
                or model_mismatch(want, ema_sd)
                or optimizer_mismatch(p.optimizer.optimizer, optim_sd)
            )
        except (RuntimeError, ValueError, KeyError, TypeError) as err:  # unreadable files
            problem = _first_line(err)
    problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise _misfit(loaded, problem)
    scatter_model_state(p.wrapped, model_sd)
    p.ema.load_state_dict(ema_sd)
    scatter_optimizer_state(p.wrapped, p.optimizer.optimizer, optim_sd)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _misfit(loaded: Loaded, why: str) -> TrainingError:
    return TrainingError(f"checkpoint {loaded.uri} does not fit this model/optimizer: {why}")
