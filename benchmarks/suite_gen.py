"""The generation section of gpu_suite.py, and the models every section shares.

Ours = the project's shard worker as `generate` runs it: a `ShardWorker` over a fresh triplets table, solving
with `make_solver(PairsJob)` (the job's switches set on the denoiser, then `teacher_latents`: CFG in one forward)
and writing with the project's `merge_rows` (LanceDB; pylance appends where lancedb is not installed), the
write on the async writer's thread. Baseline: diffusers' `StableDiffusionPipeline(output_type="latent")` at the
same batch, dtype, scheduler, steps and guidance (its call alone, no write: the conservative side).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from suite_harness import PeakMemory, Suite, count_flops, free_memory, median, prompts_for, time_calls

from instaflow_core.config import PairsConfig
from instaflow_core.generation.shards import ShardWorker
from instaflow_core.generation.solvers import make_solver, teacher_latents
from instaflow_core.generation.triplets import PairsJob, SolverSpec, TripletJob, triplet_schema
from instaflow_core.inference.images import decode_latents
from instaflow_core.models.family import Model
from instaflow_core.models.sd import make_scheduler
from instaflow_core.models.switches import set_switches, switch_on


# ====================================================================================== shared state
class State:
    """The models of the run (SD-family `Model`s): `ours` (fast-path switches on) and `base` (diffusers
    defaults), both copies of `master` (float32) in the run's dtype, so every side starts from the same weights."""

    def __init__(self, s: Suite, master: Model) -> None:
        dev = s.device
        self.dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # CPU: bf16 convs are slow here
        self.base = copy_model(master, self.dtype)
        self.ours = copy_model(master, self.dtype)
        del master
        free_memory()
        count_model_flops(s, self.base)
        on = dev.type == "cuda"  # the switches' "auto": what the project does on this device
        self.ours_flags = set_switches(self.ours.denoiser, sdpa=True, channels_last=on)
        set_switches(self.ours.vae, sdpa=True, channels_last=on)
        self.tmp = tempfile.mkdtemp(prefix="gpu-suite-")
        self.gen = GenTables(s, self.tmp)
        self.table: Any = None  # the training section's Lance table, made on first use


def copy_model(c: Model, dtype: torch.dtype) -> Model:
    nets = {k: copy.deepcopy(c[k]).to(dtype=dtype).eval() for k in ("unet", "vae", "text_encoder")}
    return dataclasses.replace(c, parts={**c.parts, **nets, "scheduler": copy.deepcopy(c.scheduler)})


@torch.no_grad()
def count_model_flops(s: Suite, c: Model) -> None:
    """FLOPs of one sample through each network (batch 1): the basis of every MFU in the table."""
    dev, L = s.device, s.preset.latent
    unet, text_encoder = c.denoiser, c["text_encoder"]
    x = torch.randn(1, 4, L, L, device=dev, dtype=unet.dtype)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim, device=dev, dtype=unet.dtype)
    t = torch.tensor([500.0], device=dev)
    ids = c["tokenizer"](["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(
        dev
    )
    f = s.flops
    f["unet_forward"] = count_flops(lambda: unet(x, t, encoder_hidden_states=cond))
    if dev.type == "cpu":  # the row estimates of the time budget use this CPU's measured rate
        sec = median(time_calls(lambda: unet(x, t, encoder_hidden_states=cond), dev, iters=3))
        s.rate = f["unet_forward"] / sec
    f["text_encoder"] = count_flops(lambda: text_encoder(ids))
    f["vae_decode"] = count_flops(lambda: c.vae.decode(x.to(c.vae.dtype)))
    g, steps = s.preset.guidance, s.preset.steps
    f["triplet"] = steps * (2 if g > 1 else 1) * f["unet_forward"]  # the count: steps x 2 for CFG
    f["one_step_image"] = f["unet_forward"] + f["text_encoder"] + f["vae_decode"]
    f["sd_image"] = steps * 2 * f["unet_forward"] + 2 * f["text_encoder"] + f["vae_decode"]


# ====================================================================================== generation
class _AppendTable:
    """Where lancedb is not installed (the GPU image carries pylance alone): what the shard worker asks of a
    fresh table (its schema, no rows yet), written by appends to a Lance dataset."""

    def __init__(self, uri: str, schema: Any) -> None:
        self.uri, self.schema, self.name = uri, schema, os.path.basename(uri)

    def count_rows(self) -> int:
        return 0  # fresh per measured call: nothing to skip

    def write(self, rows: Any) -> None:
        import lance

        lance.write_dataset(rows, self.uri, mode="append" if os.path.exists(self.uri) else "create")


class GenTables:
    """A fresh triplets table per measured call (the project's schema), and the project's write into it."""

    def __init__(self, s: Suite, tmp: str) -> None:
        L = s.preset.latent
        self.tmp, self.n, self.tables = tmp, 0, 0
        self.schema = triplet_schema((4, L, L))
        try:
            import lancedb

            self.db: Any = lancedb.connect(os.path.join(tmp, "gen"))
        except ImportError:
            self.db = None
        self.kind = "LanceDB merge_rows" if self.db is not None else "pylance appends (no lancedb)"

    def new(self) -> Any:
        self.tables += 1
        name = f"triplets{self.tables}"
        if self.db is not None:
            return self.db.create_table(name, schema=self.schema)
        return _AppendTable(os.path.join(self.tmp, f"{name}.lance"), self.schema)

    @staticmethod
    def write(table: Any, rows: Any) -> None:
        if isinstance(table, _AppendTable):
            table.write(rows)
            return
        from instaflow_core.store.tables import merge_rows

        merge_rows(table, rows, "triplet_id")  # what PairGeneration.shard hands the ShardWorker

    def jobs(self, n: int) -> list[TripletJob]:
        i0, self.n = self.n, self.n + n
        return [TripletJob(f"{i:032x}", f"{i:08d}", p, i) for i, p in enumerate(prompts_for(n, i0), i0)]


def make_job(s: Suite, b: int, steps: int | None = None, **switches: Any) -> PairsJob:
    """The PairsJob `generate` builds from the config, with the switches at their defaults unless given."""
    pr = s.preset
    solver = SolverSpec(
        kind="teacher", scheduler="dpmsolver++", steps=steps or pr.steps, guidance=pr.guidance
    )
    return PairsJob(solver=solver, pairs=PairsConfig(batch_size=b, guidance_scale=pr.guidance), **switches)


def ours_generate(
    s: Suite,
    st: State,
    b: int,
    k: int,
    *,
    comps: Model | None = None,
    steps: int | None = None,
    decode: bool = False,
    **sw,
) -> None:
    """k batches of b triplets through the project's shard worker into a fresh table."""
    comps, dev = comps or st.ours, s.device
    job = make_job(s, b, steps, **sw)
    solve = make_solver(job, comps, str(dev))
    if decode:  # what a pipeline that returns images would add per batch
        inner = solve

        def solve(prompts: list[str], seeds: list[int]) -> Any:
            x = inner(prompts, seeds)
            decode_latents(comps, x, batch_size=len(prompts))
            return x

    ShardWorker(
        table=st.gen.new(),
        solve=solve,
        teacher="gpu-suite",
        solver=job.solver,
        batch_size=b,
        run_id="gpu-suite",
        write=st.gen.write,
        async_write=switch_on(job.async_write, dev),
    ).run(st.gen.jobs(b * k), 0, "true")


def diffusers_pipe(s: Suite, c: Model) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        unet=c.denoiser,
        scheduler=make_scheduler("dpmsolver++", c.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_generate(
    s: Suite, pipe: Any, b: int, k: int, steps: int | None = None, offset: int = 0
) -> torch.Tensor:
    side = s.preset.latent * pipe.vae_scale_factor
    for i in range(k):
        seeds = list(range(offset + i * b, offset + (i + 1) * b))
        x = (
            pipe(
                prompts_for(b, seeds[0]),
                height=side,
                width=side,
                num_inference_steps=steps or s.preset.steps,
                guidance_scale=s.preset.guidance,
                generator=[torch.Generator().manual_seed(j) for j in seeds],
                output_type="latent",
            )
            .images.float()
            .cpu()
        )
    return x


def gen_row(
    s: Suite,
    name: str,
    run: Any,
    b: int,
    k: int,
    *,
    vs: str | None = None,
    cost: float = 1.0,
    invert: bool = False,
    note: str = "",
) -> None:
    """Time k batches of b (after a 2-step warm-up call at the same shapes): triplets/s."""
    est = s.est(cost * (k + 0.1) * b * s.flops["triplet"], fixed=3)

    def fn() -> dict[str, Any]:
        with PeakMemory(s.device) as pm:
            sec = time_calls(lambda: run(b, k, None), s.device, iters=1, warm=lambda: run(b, 1, 2))[0]
        return {
            "value": b * k / sec,
            "peak_gib": pm.gib,
            "note": note,
            "extra": {"per_gpu_day": 86400 * b * k / sec, "batch": b, "batches": k, "seconds": sec},
        }

    s.row("gen", name, "triplets/s", fn, est_s=est, vs=vs, flops_per_item=s.flops["triplet"], invert=invert)


def gen_core(s: Suite, st: State) -> None:
    pr = s.preset
    pipe = diffusers_pipe(s, st.base)
    batches = pr.gen_batches[:-1] if s.args.quick else pr.gen_batches
    k = 2  # two batches per row: the first one's write overlaps the second one's solve; the last write is timed too
    for b in batches:
        gen_row(s, f"diffusers b{b}", lambda b_, k_, st_: diffusers_generate(s, pipe, b_, k_, st_), b, k)
        gen_row(
            s,
            f"ours b{b}",
            lambda b_, k_, st_: ours_generate(s, st, b_, k_, steps=st_),
            b,
            k,
            vs=f"diffusers b{b}",
            note=f"ShardWorker, {st.gen.kind}",
        )
        if b == pr.switch_batch:  # 5 steps: the same kernels as 25, a fifth of the profiler's events
            s.profile("gen ours", lambda b=b: ours_generate(s, st, b, 1, steps=min(5, pr.steps)))
    for b in pr.gen_batches[len(batches) :]:  # printed, not measured
        for side in ("diffusers", "ours"):
            s.row("gen", f"{side} b{b}", "triplets/s", dict, est_s=0, skip="--quick")
    b = pr.switch_batch

    def check() -> dict[str, Any]:  # the same ODE from the same X0: ours and diffusers agree
        seeds = list(range(b))
        a = teacher_latents(
            st.ours, prompts_for(b), seeds, steps=pr.steps, guidance=pr.guidance, device=s.device
        )
        d = diffusers_generate(s, pipe, b, 1)
        rel = float((a - d).norm() / d.norm())
        return {
            "value": rel,
            "note": f"||ours - diffusers|| / ||diffusers||, {b} latents, {str(st.dtype)[6:]} weights",
        }

    s.row("gen", "check: relative difference", "rel", check, est_s=s.est(2 * b * s.flops["triplet"]))


def gen_switches(s: Suite, st: State) -> None:
    """Each generation fast path off (or, for dtype, another precision), at the switch batch, vs ours."""
    b = s.preset.switch_batch
    ref, k = f"ours b{b}", 2
    if s.get("gen", ref) is None:
        return

    def with_unet(dtype: torch.dtype) -> Model:
        unet = copy.deepcopy(st.ours.denoiser).to(dtype)
        return dataclasses.replace(st.ours, parts={**st.ours.parts, "unet": unet})

    precisions = (("fp32", torch.float32, 8.0), ("fp16", torch.float16, 1.0), ("bf16", torch.bfloat16, 1.0))
    for label, dtype, cost in precisions:
        if dtype == st.dtype:
            continue
        comps = with_unet(dtype)
        gen_row(
            s,
            f"switch dtype: {label} weights",
            lambda b_, k_, st_, c=comps: ours_generate(s, st, b_, k_, comps=c, steps=st_),
            b,
            k,
            vs=ref,
            cost=cost,
            invert=True,
            note=f"models.dtype; ratio: {str(st.dtype)[6:]} over this",
        )
        del comps
        free_memory()
    unet = st.ours.denoiser
    cl_on = bool(st.ours_flags.get("channels_last"))
    toggles = [  # (label, config key, set the UNet to, the job's switches)
        ("sdpa off (classic attention)", "diffusers default attention", dict(sdpa=False), {}),
        ("channels_last " + ("off" if cl_on else "on"), "generation.channels_last",
         dict(channels_last=not cl_on), dict(channels_last=not cl_on)),
        ("CFG as two forwards", "generation.cfg_batched=false", {}, dict(cfg_batched=False)),
        ("VAE decode every batch", "(generation never decodes)", {}, dict(decode=True)),
        ("sync write (no async writer)" if s.device.type == "cuda" else "async writer on", "generation.async_write",
         {}, dict(async_write=s.device.type != "cuda")),
    ]  # fmt: skip
    for label, key, on_unet, sw in toggles:
        before = {k: v for k, v in {**st.ours_flags, "sdpa": True}.items() if k in on_unet}
        set_switches(unet, **on_unet)
        try:
            gen_row(
                s,
                f"switch {label}",
                lambda b_, k_, st_, sw=sw: ours_generate(s, st, b_, k_, steps=st_, **sw),
                b,
                k,
                vs=ref,
                cost=1.5,
                invert=True,
                note=f"{key}; ratio: ours over this",
            )
        finally:
            set_switches(unet, **before)


@contextlib.contextmanager
def compiled(s: Suite, modules: list[torch.nn.Module], mode: str | None) -> Iterator[str]:
    """The modules compiled in place (set_switches) inside the block, eager again after it."""
    backend = "inductor" if s.device.type == "cuda" else "eager"  # CPU: dynamo only (inductor: minutes here)
    torch._dynamo.reset()
    for m in modules:
        set_switches(
            m, compile=True, compile_mode=mode if backend == "inductor" else None, compile_backend=backend
        )
    try:
        yield backend
    finally:
        for m in modules:
            set_switches(m, compile=False)
        torch._dynamo.reset()  # also frees the CUDA-graph pools (torch >= 2.x resets cudagraph trees)


def gen_compile(s: Suite, st: State) -> None:
    b = s.preset.switch_batch
    ref, name = f"ours b{b}", f"switch compile on (teacher UNet) b{b}"
    if s.get("gen", ref) is None:
        return
    est = s.compile_s["gen"] + s.est(2.1 * b * s.flops["triplet"])
    if s.skip_compile or s.left() < est:
        s.row("gen", name, "triplets/s", dict, est_s=est, skip=s.skip_compile)
        return
    with compiled(s, [st.ours.denoiser], None) as backend:
        try:
            first = time_calls(lambda: ours_generate(s, st, b, 1, steps=2), s.device, iters=1, warm=False)[0]
        except Exception as err:  # a row of its own, so the run goes on
            s.failed("gen", name, "triplets/s", err)
            return
        gen_row(
            s,
            name,
            lambda b_, k_, st_: ours_generate(s, st, b_, k_, steps=st_),
            b,
            2,
            vs=ref,
            note=f"generation.compile; default mode, {backend}; first call {first:.0f}s (compiles)",
        )
