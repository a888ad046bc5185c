"""The inference section of gpu_suite.py: `InstaFlowPipeline` at 1 step vs `StableDiffusionPipeline` at
`preset.steps` steps with CFG, both end to end (tokenise, text encoder, UNet, VAE decode, image tensor on the
device), latency at batch 1 and throughput at the larger batch. The compile rows use the project's
`inference.fast.speed_up` (UNet + VAE decoder compiled in place, mode="reduce-overhead": CUDA graphs)."""

from __future__ import annotations

from typing import Any

import torch
from suite_gen import State, diffusers_pipe
from suite_harness import PeakMemory, Suite, median, prompts_for, time_calls

from instaflow_core.inference.fast import speed_up
from instaflow_core.inference.pipeline import InstaFlowPipeline
from instaflow_core.models.switches import set_switches


def infer_calls(s: Suite, st: State) -> tuple[Any, Any]:
    dev, pr = s.device, s.preset
    ours = InstaFlowPipeline.from_model(st.ours)
    ours.set_progress_bar_config(disable=True)
    sd = diffusers_pipe(s, st.base)

    def ours_call(b: int) -> Any:
        return ours(
            prompts_for(b),
            num_inference_steps=1,
            guidance_scale=1.0,
            output_type="pt",
            generator=torch.Generator(dev).manual_seed(0),
        ).images

    def sd_call(b: int) -> Any:
        return sd(
            prompts_for(b),
            num_inference_steps=pr.steps,
            guidance_scale=pr.guidance,
            output_type="pt",
            generator=torch.Generator(dev).manual_seed(0),
        ).images

    return ours_call, sd_call


def ours_pipe(st: State) -> InstaFlowPipeline:
    return InstaFlowPipeline.from_model(st.ours)


def infer_row(
    s: Suite,
    name: str,
    call: Any,
    b: int,
    flops: float,
    *,
    latency: bool,
    vs: str | None = None,
    calls: int = 3,
    note: str = "",
    invert: bool = False,
) -> None:
    def fn() -> dict[str, Any]:
        with PeakMemory(s.device) as pm:
            sec = median(time_calls(lambda: call(b), s.device, iters=calls))
        value = 1e3 * sec if latency else b / sec
        return {
            "value": value,
            "peak_gib": pm.gib,
            "note": note,
            "extra": {"batch": b, "seconds_per_call": sec},
        }

    s.row(
        "infer",
        name,
        "ms" if latency else "img/s",
        fn,
        est_s=s.est((calls + 1) * b * flops, fixed=2),
        vs=vs,
        flops_per_item=b * flops if latency else flops,
        invert=invert,
    )


def infer_core(s: Suite, st: State) -> None:
    b1, bn = s.preset.infer_batches
    ours_call, sd_call = infer_calls(s, st)
    f1, fsd = s.flops["one_step_image"], s.flops["sd_image"]
    infer_row(
        s, f"sd{s.preset.steps} b{b1}", sd_call, b1, fsd, latency=True, note=f"{s.preset.steps} steps, CFG"
    )
    infer_row(
        s,
        f"ours b{b1}",
        ours_call,
        b1,
        f1,
        latency=True,
        vs=f"sd{s.preset.steps} b{b1}",
        calls=s.preset.latency_calls,
        note="1 step",
    )
    infer_row(s, f"sd{s.preset.steps} b{bn}", sd_call, bn, fsd, latency=False, calls=2)
    infer_row(s, f"ours b{bn}", ours_call, bn, f1, latency=False, vs=f"sd{s.preset.steps} b{bn}")
    s.profile("infer ours b1", lambda: ours_call(b1))


def infer_switches(s: Suite, st: State) -> None:
    b1 = s.preset.infer_batches[0]
    ref = f"ours b{b1}"
    ours_call, _ = infer_calls(s, st)
    cl_on = bool(st.ours_flags.get("channels_last"))
    for label, key, value in (("sdpa off", "sdpa", False), (f"channels_last {'off' if cl_on else 'on'}",
                                                              "channels_last", not cl_on)):  # fmt: skip
        for m in (st.ours.denoiser, st.ours.vae):
            set_switches(m, **{key: value})
        infer_row(
            s,
            f"switch {label} b{b1}",
            ours_call,
            b1,
            s.flops["one_step_image"],
            latency=True,
            vs=ref,
            calls=s.preset.latency_calls,
            invert=True,
            note=f"speed_up({key}=); ratio: ours over this",
        )
        for m in (st.ours.denoiser, st.ours.vae):
            set_switches(m, **{key: not value})


def infer_compile(s: Suite, st: State, which: int = 0) -> None:
    """UNet and VAE decoder compiled in place, mode="reduce-overhead" (CUDA graphs: the shapes are static), at
    the latency batch (which=0) or the throughput batch (which=1)."""
    ours_call, _ = infer_calls(s, st)
    for b in s.preset.infer_batches[which : which + 1]:
        ref, name = f"ours b{b}", f"switch compile on (UNet+VAE dec) b{b}"
        if s.get("infer", ref) is None:
            continue
        est = s.compile_s["infer"] + s.est(20 * b * s.flops["one_step_image"], fixed=5)
        if s.skip_compile or s.left() < est:
            s.row("infer", name, "ms" if b == 1 else "img/s", dict, est_s=est, skip=s.skip_compile)
            continue
        gpu = s.device.type == "cuda"
        backend = "inductor" if gpu else "eager"  # CPU: dynamo only (inductor takes minutes here)
        torch._dynamo.reset()
        speed_up(ours_pipe(st), compile=True, mode="reduce-overhead" if gpu else None, backend=backend)
        try:
            try:  # compile, graph capture
                first = time_calls(lambda b=b: ours_call(b), s.device, iters=2, warm=False)
            except Exception as err:  # a row of its own, so the run goes on
                s.failed("infer", name, "ms" if b == 1 else "img/s", err)
                continue
            infer_row(
                s,
                name,
                ours_call,
                b,
                s.flops["one_step_image"],
                latency=b == 1,
                vs=ref,
                calls=s.preset.latency_calls if b == 1 else 3,
                note=f"speed_up(); {'reduce-overhead' if gpu else 'default mode'}, {backend}; first call {first[0]:.0f}s",
            )
        finally:
            speed_up(ours_pipe(st), compile=False, channels_last=bool(st.ours_flags.get("channels_last")))
            torch._dynamo.reset()  # also frees the CUDA-graph pools
