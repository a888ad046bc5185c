"""The training section of gpu_suite.py: a reflow step at 512 px, ours vs a plain diffusers-example loop.

Both read the same Lance table on local disk (latents X1 float16, X0 regenerated from the seed), train an fp32
copy of the same UNet under bf16 autocast with AdamW, gradient clipping and an EMA, and call `.item()` on the
loss every step as their loops do.

- ours: the project's pieces as `training.train` sets them up: the family's `Velocity` over the UNet,
  `apply_perf_switches` (the switches on the UNet from a TrainConfig), `build_optimizer` (cfg.adamw: fused on
  CUDA), the project's `EMA` (one `_foreach_lerp_`), `ConditionCache` with its per-prompt cache, `reflow_batch_loss`, `triplet_batches`
  over `TripletDataset` behind the `PinnedPrefetcher` (cfg.prefetch). The step body is `training/loop.py::_loop`'s
  without accelerate or checkpoints (a checkpoint of an 860M UNet with its EMA and optimizer is ~10 GB: not a
  hot path, and minutes of disk).
- plain: train_text_to_image.py's loop: torch AdamW defaults, diffusers `EMAModel`, the text encoder on every
  batch, a DataLoader over the table with no pinning and no read-ahead, blocking host-to-device copies.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from suite_harness import PeakMemory, Suite, count_flops, free_memory, prompts_for, time_calls

from instaflow_core.config import StorageConfig, TrainConfig, TrainStageConfig
from instaflow_core.generation.triplets import SolverSpec, TripletJob, build_rows, triplet_schema
from instaflow_core.models.family import Velocity
from instaflow_core.models.switches import set_switches, switch_on
from instaflow_core.refs import TableRef
from instaflow_core.store.dataset import TripletDataset
from instaflow_core.training.data import BatchRequest, to_device
from instaflow_core.training.ema import EMA
from instaflow_core.training.job import triplet_batches
from instaflow_core.training.losses import reflow_batch_loss
from instaflow_core.training.prefetch import PinnedPrefetcher
from instaflow_core.training.setup import apply_perf_switches, build_optimizer
from instaflow_core.training.student import ConditionCache

LR, DECAY = 1e-5, 0.9999


def make_table(s: Suite, st: Any) -> tuple[Any, Any] | None:
    """A triplets table of `preset.table_rows` random latents (2 rows per prompt) via the project's schema;
    None without pylance (then both loops read the same batches from memory, and the rows say so)."""
    if getattr(st, "table", None) is not None:
        return st.table
    try:
        import lance
    except ImportError:
        return None
    L, n = s.preset.latent, s.preset.table_rows
    prompts = prompts_for(max(1, n // 2))
    jobs = [TripletJob(f"{i:032x}", f"{i // 2:08d}", prompts[i // 2 % len(prompts)], i) for i in range(n)]
    x1 = np.random.default_rng(0).standard_normal((n, 4, L, L), dtype=np.float32)
    rows = build_rows(
        jobs,
        x1,
        schema=triplet_schema((4, L, L)),
        teacher="bench",
        shard=0,
        run_id="gpu-suite",
        solver=SolverSpec(kind="teacher", steps=s.preset.steps, guidance=s.preset.guidance),
    )
    lance.write_dataset(rows, f"{st.tmp}/triplets.lance")
    st.table = (TableRef(db_uri=st.tmp, table="triplets", version=1, rows=n), StorageConfig(root=st.tmp))
    return st.table


class Trainer:
    """One training setup over an fp32 copy of the base UNet. `step(batch)` is one optimizer step.

    ours: every switch at its config default for this device ("auto"), or as given in `switches`
    (TrainConfig keys: adamw, prefetch, sdpa, channels_last, gradient_checkpointing; and the suite's own
    ema="loop" and embed_cache=False baselines).
    """

    def __init__(self, s: Suite, st: Any, kind: str, **switches: Any) -> None:
        self.s, self.st, self.kind, self.dev = s, st, kind, s.device
        self.sw = dict(ema="foreach", embed_cache=True, gradient_checkpointing=False) | switches
        unet = copy.deepcopy(st.base.denoiser).float().train().requires_grad_(True)
        self.unet, self.text, self.tok = unet, st.base["text_encoder"], st.base["tokenizer"]
        cfg_keys = ("adamw", "prefetch", "sdpa", "channels_last", "gradient_checkpointing")
        self.cfg = TrainConfig(
            stages=[TrainStageConfig(steps=1, batch_size=1)],
            lr=LR,
            mixed_precision="bf16",
            **{k: v for k, v in self.sw.items() if k in cfg_keys},
        )
        if kind == "ours":
            self.student = Velocity(st.base.family, unet)  # what Model.velocity() makes of the student's UNet
            self.applied = apply_perf_switches(self.student, self.cfg, self.dev)  # the project's set-up
            self.student.to(self.dev)
            self.embed = ConditionCache(st.base, max_entries=1024 if self.sw["embed_cache"] else 0)
            self.loss_fn = reflow_batch_loss(self.embed)
            self.ema = EMA(self.student, DECAY).to(self.dev)
            self.opt = self._optimizer()
            self.sw |= {
                "adamw": self.opt.defaults["impl"],
                "prefetch": switch_on(self.cfg.prefetch, self.dev),
            }
            self.sw |= {k: v for k, v in self.applied.items() if k in cfg_keys}
        else:
            set_switches(unet, gradient_checkpointing=self.sw["gradient_checkpointing"])
            unet.to(self.dev)
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(unet.parameters(), decay=DECAY)
            self.ema.to(self.dev)
            self.opt = torch.optim.AdamW(
                unet.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
            )
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.it: Iterator | None = None
        self.prefetcher: Any = None

    def _optimizer(self) -> torch.optim.Optimizer:
        opt = build_optimizer(self.student, self.cfg, self.dev)
        for g in opt.param_groups:  # build_optimizer starts at 1.0 for the LR schedule to scale
            g["lr"] = LR
        return opt

    def set(self, **switches: Any) -> None:
        """Flip switches in place (a new AdamW for another implementation: its state starts over)."""
        for k, v in switches.items():
            self.sw[k] = v
            if k in ("sdpa", "channels_last", "gradient_checkpointing"):
                set_switches(self.unet, **{k: v})
            elif k == "adamw":
                self.cfg = self.cfg.model_copy(update={"adamw": v})
                self.opt = self._optimizer()
            elif k == "embed_cache":
                self.embed.max_entries = 1024 if v else 0
                self.embed._cache.clear()

    # ---------------------------------------------------------------------------------- data
    def open_data(self, micro: int) -> None:
        self.close_data()
        found = make_table(self.s, self.st)
        it: Iterable
        if found is None:  # no pylance on this machine
            it = _memory_batches(self.s.preset.latent, micro)
        elif self.kind == "ours":
            table, storage = found
            req = BatchRequest(0, TrainStageConfig(steps=1, batch_size=micro), micro, 0, 0, 1, 0)
            it = triplet_batches(table, storage)(req)
        else:
            table, storage = found
            ds = TripletDataset(table, storage, micro, shuffle=True, drop_last=True, prefetch=False)
            it = _epochs(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0))
        if self.kind == "ours" and self.sw["prefetch"]:  # what DeviceFeed does in the loop
            it = self.prefetcher = PinnedPrefetcher(it, self.dev, depth=2)
        self.it = iter(it)

    def close_data(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.it = self.prefetcher = None

    def next_batch(self) -> dict:
        batch = next(self.it)
        if self.kind == "ours" and self.prefetcher is None:
            batch = to_device(batch, self.dev)
        return batch

    def synthetic(self, b: int) -> dict:
        L = self.s.preset.latent
        g = torch.Generator().manual_seed(b)
        return {
            "x0": torch.randn(b, 4, L, L, generator=g).to(self.dev),
            "x1": torch.randn(b, 4, L, L, generator=g).to(self.dev),
            "prompt": prompts_for(b),
            "triplet_id": [f"{i:032x}" for i in range(b)],
        }

    # ---------------------------------------------------------------------------------- one step
    def autocast(self) -> Any:
        return torch.autocast(self.dev.type, dtype=torch.bfloat16)

    def step(self, batch: dict) -> float:
        if self.kind == "ours":  # training/loop.py::_loop, one micro-batch per step, one process
            with self.autocast():
                loss = self.loss_fn(self.student, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.sw["ema"] == "foreach":
                self.ema.update(self.student)  # the project's EMA: one _foreach_lerp_
            else:
                loop_ema_update(self.ema.model.parameters(), self.student.parameters(), DECAY)
            return loss.item()
        # train_text_to_image.py, reduced to reflow: x0/x1 in, text encoder every step, MSE on the velocity
        x0, x1 = batch["x0"].to(self.dev), batch["x1"].to(self.dev)
        ids = self.tok(
            batch["prompt"],
            padding="max_length",
            max_length=self.tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.dev)
        with torch.no_grad():
            cond = self.text(ids, return_dict=False)[0]
        t = torch.rand(x0.shape[0], device=self.dev)
        x_t = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
        with self.autocast():
            pred = self.unet(x_t, (1 - t) * 1000, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), (x1 - x0).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.ema.step(self.unet.parameters())
        return loss.item()

    def close(self) -> None:
        self.close_data()
        for k in ("unet", "student", "ema", "opt", "params", "embed", "loss_fn"):
            self.__dict__.pop(k, None)
        free_memory()


@torch.no_grad()
def loop_ema_update(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], decay: float) -> None:
    """The per-tensor EMA (two kernels per tensor): the baseline of the project's foreach EMA."""
    for e, p in zip(ema_params, params, strict=True):
        if e.is_floating_point():
            e.mul_(decay).add_(p.detach().to(e.dtype), alpha=1.0 - decay)


def _memory_batches(latent: int, micro: int) -> Iterator[dict]:
    """CPU batches shaped like TripletDataset's (the fallback when pylance is missing)."""
    prompts = prompts_for(64)
    for i in itertools.count():
        g = torch.Generator().manual_seed(i)
        yield {"x0": torch.randn(micro, 4, latent, latent, generator=g),
               "x1": torch.randn(micro, 4, latent, latent, generator=g),
               "prompt": [prompts[(i * micro + j) % 64] for j in range(micro)],
               "triplet_id": [f"{i * micro + j:032x}" for j in range(micro)]}  # fmt: skip


def _epochs(loader: Any) -> Iterator[dict]:
    while True:
        yield from loader


def train_flops(s: Suite, st: Any) -> float:
    """Model FLOPs of one training sample: UNet forward + backward at batch 1 (no recomputation counted)."""
    if "train_sample" not in s.flops:
        unet = copy.deepcopy(st.base.denoiser).float().train().requires_grad_(True)
        L, D = s.preset.latent, unet.config.cross_attention_dim
        x, cond = torch.randn(1, 4, L, L, device=s.device), torch.randn(1, 77, D, device=s.device)
        t = torch.tensor([500.0], device=s.device)

        def fwd_bwd() -> None:
            # autocast changes dtypes, not FLOPs; the meta device (--flops-only) has no autocast
            amp = s.device.type in ("cuda", "cpu")
            with torch.autocast(s.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                out = unet(x, t, encoder_hidden_states=cond).sample
            out.float().square().mean().backward()

        s.flops["train_sample"] = count_flops(fwd_bwd)
        del unet
        free_memory()
    return s.flops["train_sample"]


def train_row(
    s: Suite,
    tr: Trainer,
    name: str,
    micro: int,
    *,
    vs: str | None = None,
    invert: bool = False,
    note: str = "",
) -> Any:
    """2 warm-up steps, then preset.train_steps timed steps on the table's batches: samples/s, data-wait share."""
    n, f = s.preset.train_steps, train_flops(s, tr.st)
    est = s.est((n + 2) * micro * f * (4 / 3 if tr.sw["gradient_checkpointing"] else 1), fixed=4)

    def fn() -> dict[str, Any]:
        tr.open_data(micro)
        wait = [0.0]

        def one() -> None:
            t0 = time.perf_counter()
            batch = tr.next_batch()
            wait[0] += time.perf_counter() - t0
            tr.step(batch)

        try:
            for _ in range(2):  # warm-up: Adam state, cuDNN plans, the reader's first windows
                one()
            wait[0] = 0.0
            with PeakMemory(s.device) as pm:
                sec = time_calls(lambda: [one() for _ in range(n)], s.device, iters=1, warm=False)[0]
        finally:
            tr.close_data()
        switches = (
            ", ".join(f"{k}={v}" for k, v in tr.sw.items())
            if tr.kind == "ours"
            else f"gradient_checkpointing={tr.sw['gradient_checkpointing']}"
        )
        return {
            "value": micro * n / sec,
            "peak_gib": pm.gib,
            "note": note,
            "extra": {
                "micro_batch": micro,
                "steps": n,
                "seconds": sec,
                "data_wait_share": min(1.0, wait[0] / sec),
                "switches": switches,
            },
        }

    r = s.row("train", name, "samples/s", fn, est_s=est, vs=vs, flops_per_item=f, invert=invert)
    if r.status == "ok":
        src = "" if getattr(tr.st, "table", None) else "in-memory batches (no pylance); "
        r.note = (f"data wait {100 * r.extra['data_wait_share']:.0f}%; {src}" + r.note).rstrip("; ")
    return r


def train_core(s: Suite, st: Any) -> None:
    m = s.preset.train_micro
    for kind in ("plain", "ours"):
        tr = Trainer(s, st, kind)
        train_row(s, tr, f"{kind} micro {m}", m, vs=f"plain micro {m}" if kind == "ours" else None)
        if kind == "ours":
            tr.open_data(m)
            s.profile("train ours step", lambda tr=tr: tr.step(tr.next_batch()))
            tr.close_data()
        tr.close()


def train_switches(s: Suite, st: Any) -> None:
    m, ref = s.preset.train_micro, f"ours micro {s.preset.train_micro}"
    if s.get("train", ref) is None:
        return
    tr = Trainer(s, st, "ours")
    on = dict(tr.sw)

    def flip(key: str) -> str:
        return "off" if on[key] else "on"

    offs = [(f"AdamW {impl}", "reflow.adamw", dict(adamw=impl)) for impl in ("fused", "foreach", "for-loop")
            if impl != on["adamw"]]  # fmt: skip
    offs += [
        ("EMA per-tensor loop", "(the EMA is always foreach)", dict(ema="loop")),
        (f"pinned prefetch {flip('prefetch')}", "reflow.prefetch", dict(prefetch=not on["prefetch"])),
        ("text-embedding cache off", "(ConditionCache max_entries)", dict(embed_cache=False)),
        (f"channels_last {flip('channels_last')}", "reflow.channels_last",
         dict(channels_last=not on["channels_last"])),
        ("sdpa off", "reflow.sdpa", dict(sdpa=False)),
    ]  # fmt: skip
    for label, key, off in offs:
        tr.set(**off)
        try:
            train_row(s, tr, f"switch {label}", m, vs=ref, invert=True, note=f"{key}; ratio: ours over this")
        finally:
            tr.set(**{k: on[k] for k in off})
    tr.close()
