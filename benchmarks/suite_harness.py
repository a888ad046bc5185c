"""The measuring machinery of gpu_suite.py: device peaks, timing, FLOP counts, profiles, rows, the time budget."""

from __future__ import annotations

import argparse
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def prompts_for(n: int, offset: int = 0) -> list[str]:
    return [f"a photo of object number {i + offset} on a table, style {i % 7}" for i in range(n)]


# ====================================================================================== device facts
PEAKS = [  # (name fragment, spec dense bf16 FLOP/s, achievable FLOP/s or None)
    ("H200", 989e12, 790e12),
    ("H100 NVL", 835e12, None),
    ("H100 PCIe", 756e12, None),
    ("H100", 989e12, 790e12),
    ("GH200", 989e12, 790e12),
    ("A100", 312e12, None),
    ("L40S", 362e12, None),
    ("A10G", 70e12, None),
]


def peak_flops(device: torch.device) -> dict[str, Any]:
    """Spec and achievable bf16 dense FLOP/s for the device (achievable: the ~790 TFLOP/s an 8192^3 bf16 matmul
    reaches on an H100/H200; elsewhere the spec). On a GPU also one measured 8192^3 matmul rate, for reference."""
    if device.type != "cuda":
        return {
            "device": platform.processor() or "cpu",
            "spec": None,
            "achievable": None,
            "source": "cpu: no MFU",
        }
    name = torch.cuda.get_device_name(device)
    spec, ach = next(((s, a) for frag, s, a in PEAKS if frag in name), (None, None))
    out = {
        "device": name,
        "spec": spec,
        "achievable": ach or spec,
        "source": f"table entry for {name}" + ("" if ach else " (spec; no measured figure)")
        if spec
        else "unknown device",
    }
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = time_calls(lambda: a @ b, device, iters=10, warm=False)
    out["measured_matmul"] = 2 * 8192**3 / median(times)
    if out["achievable"] is None:
        out.update(
            achievable=out["measured_matmul"], source="measured 8192^3 bf16 matmul (device not in the table)"
        )
    return out


# ====================================================================================== timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def time_calls(
    fn: Callable[[], Any], device: torch.device, iters: int, warm: bool | Callable = True
) -> list[float]:
    """Seconds per call of `fn`: CUDA events around each call on a GPU, perf_counter on CPU. `warm`: run fn (or
    the given warm-up callable) once first, untimed."""
    if warm:
        (warm if callable(warm) else fn)()
    sync(device)
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


class PeakMemory:
    """Peak device memory allocated inside the block, GiB (None on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.gib = device, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of fn, from torch's FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def free_memory() -> None:
    """Return freed CUDA blocks to the device (after a collection: module graphs hold reference cycles)."""
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def profile_top(fn: Callable[[], Any], device: torch.device, top: int = 10) -> list[dict[str, Any]]:
    """torch.profiler over one call of fn: the `top` ops/kernels by self device time (self CPU time on CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)

    def self_us(e: Any) -> float:
        if device.type != "cuda":
            return float(e.self_cpu_time_total)
        for attr in ("self_device_time_total", "self_cuda_time_total"):  # the name changed in torch 2.4
            v = getattr(e, attr, None)
            if v is not None:
                return float(v)
        return 0.0

    def counted(
        e: Any,
    ) -> bool:  # on a GPU: kernels, copies, memsets (device events), not the CPU ops above them
        if device.type != "cuda":
            return True
        kind = getattr(e, "device_type", None)
        return kind is not None and kind != DeviceType.CPU and not getattr(e, "is_user_annotation", False)

    events = [e for e in prof.key_averages() if counted(e) and self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    return [
        {"name": e.key[:90], "calls": int(e.count), "self_ms": self_us(e) / 1e3, "share": self_us(e) / total}
        for e in events[:top]
    ]


# ====================================================================================== rows and the run
@dataclass
class Row:
    section: str  # gen | train | infer
    name: str
    unit: str  # triplets/s | samples/s | img/s | ms
    value: float | None = None
    flops_per_item: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    vs: str | None = None  # the row this one is compared with
    ratio: float | None = None  # > 1: this row is faster than `vs`
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    status: str = "ok"  # ok | skipped | error


def fmt_value(r: Row) -> str:
    if r.value is None:
        return "-"
    v = r.value
    return f"{v:.1f} {r.unit}" if v >= 100 else f"{v:.3g} {r.unit}"


class Suite:
    """The run: device, preset, budget, rows; sections call `row(...)` for every measurement."""

    def __init__(self, args: argparse.Namespace, preset: Any, device: torch.device) -> None:
        self.args, self.preset, self.device = args, preset, device
        self.t0 = time.perf_counter()
        self.rows: list[Row] = []
        self.profiles: dict[str, list] = {}
        self.flops: dict[str, int] = {}
        self.peak = peak_flops(self.device)
        self.rate = 0.35 * self.peak["achievable"] if self.peak["achievable"] else 5e9  # FLOP/s for estimates
        self.skip_compile = ""  # why the compile rows do not run (set by the sections)
        # compile-time estimates (inductor on a 16-core host; dynamo's eager backend on this CPU)
        gpu = self.device.type == "cuda"
        self.compile_s = {"infer": 120.0 if gpu else 20.0, "gen": 80.0 if gpu else 20.0}

    def left(self) -> float:
        return self.args.time_budget - (time.perf_counter() - self.t0)

    def est(self, flops: float, fixed: float = 1.0) -> float:
        """Seconds a row should take: its FLOPs at ~35% of the achievable peak (on CPU at the measured rate),
        plus `fixed` seconds of set-up (at most 1 s on CPU, where the models are tiny)."""
        return flops / self.rate + (fixed if self.device.type == "cuda" else min(fixed, 1.0))

    def get(self, section: str, name: str) -> Row | None:
        return next(
            (r for r in self.rows if r.section == section and r.name == name and r.status == "ok"), None
        )

    def row(
        self,
        section: str,
        name: str,
        unit: str,
        fn: Callable[[], dict[str, Any]],
        *,
        est_s: float,
        vs: str | None = None,
        flops_per_item: float | None = None,
        invert: bool = False,
        skip: str = "",
    ) -> Row:
        """Measure one row unless `skip` says why not or the time budget is out. fn returns {"value", "peak_gib",
        "extra", "note"}. `invert`: the ratio is vs.value / value (switch rows measuring the slower "off" side)."""
        r = Row(section, name, unit, vs=vs, flops_per_item=flops_per_item)
        self.rows.append(r)
        if skip:
            r.status, r.note = "skipped", skip
        elif self.left() < est_s:
            r.status, r.note = "skipped", f"time budget: needs ~{est_s:.0f}s, {max(self.left(), 0):.0f}s left"
        else:
            t_row = time.perf_counter()
            try:
                out = fn()
                r.value, r.peak_gib = out.get("value"), out.get("peak_gib")
                r.extra, r.note = out.get("extra", {}), out.get("note", "")
            except Exception as err:  # one failing row must not lose a one-shot GPU run
                r.status, r.note = (
                    "error",
                    f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}",
                )
                r.extra["traceback"] = traceback.format_exc()
                if is_oom(err):
                    r.note = "OOM: " + r.note
            if r.status == "error":
                free_memory()  # after the handler: the exception's frames no longer hold the row's tensors
            r.extra["row_wall_s"] = round(time.perf_counter() - t_row, 2)
        if r.status == "ok" and r.value is not None:
            per_s = 1e3 / r.value if unit == "ms" else r.value  # a latency row: items = calls
            if flops_per_item and self.peak["achievable"]:
                r.mfu = per_s * flops_per_item / self.peak["achievable"]
            base = self.get(section, vs) if vs else None
            if base is not None and base.value:
                r.ratio = (base.value / r.value) if (unit == "ms") != invert else (r.value / base.value)
        self.echo(r)
        return r

    def failed(self, section: str, name: str, unit: str, err: BaseException) -> Row:
        """An error row for work done outside a row's own function (a compile's first call, say)."""

        def fn() -> dict[str, Any]:
            raise err

        return self.row(section, name, unit, fn, est_s=0)

    def profile(self, key: str, fn: Callable[[], Any]) -> None:
        if self.args.no_profile or self.left() < 30:
            return
        try:
            self.profiles[key] = profile_top(fn, self.device)
        except Exception as err:  # the profiler is diagnostics only
            self.profiles[key] = [
                {"name": f"profiler failed: {err!r}"[:200], "calls": 0, "self_ms": 0, "share": 0}
            ]

    def echo(self, r: Row) -> None:
        if self.args.verbose:
            took = r.extra.get("row_wall_s", 0)
            print(
                f"  [{time.perf_counter() - self.t0:6.1f}s +{took:5.1f}s] {r.section} {r.name}: {fmt_value(r)} {r.note}",
                flush=True,
            )
