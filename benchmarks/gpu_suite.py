"""GPU speed suite: the three hot paths (triplet generation, a reflow training step, one-step inference), ours
against the diffusers way measured in the same run, each fast-path switch on/off as its own row; and the family
rows: a reflow step of SDXL and of FLUX.1 at real width beside the memory formula (suite_family.py).

    python benchmarks/gpu_suite.py [--quick] [--time-budget 440] [--out benchmarks/out/gpu_suite.json]
    python benchmarks/gpu_suite.py --tiny          # the same code on tiny models, on CPU, in under a minute

"Ours" is the project's own code with its CUDA defaults: the shard worker (`ShardWorker` + `make_solver` /
`teacher_latents` + the async writer), the training set-up (`apply_perf_switches`, `build_optimizer`, the EMA,
the prefetching loader, the reflow loss) and `InstaFlowPipeline` (+ `inference.fast.speed_up` for the compile rows); docs/gpu-speed.md
lists the switches each "switch ..." row turns the other way.

SD 1.5's real architecture (860M UNet, 84M VAE, 123M CLIP text encoder) from its real configs
(tests/support/sd15.py) through the SD family's `from_configs`, random weights from a fixed seed, built on the
device: nothing is downloaded (HF_HUB_OFFLINE=1). With --tiny the family rows build the tiny hub-shaped repos'
configs (tests/support/teacher_repos.py). Timings are warm, CUDA events on a GPU
(perf_counter on CPU); FLOPs come from torch.utils.flop_counter on one forward of each network, so MFU =
items/s x FLOPs per item / peak. Rows run in priority order (the comparisons the goals need first, the one-step
compile, the switches, the micro-batch search, the other compile rows) and `--time-budget` skips, with a note,
any row whose estimate no longer fits.
Prints one table and the goals; writes every number, the FLOP counts and profiler tables to `--out`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(
    1, str(Path(__file__).resolve().parents[1])
)  # the checkout (tests.support), after benchmarks/
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from instaflow_core.config import TinyModelConfig  # noqa: E402
from instaflow_core.models.family import Model  # noqa: E402
from instaflow_core.models.sd import FAMILY as SD  # noqa: E402
from instaflow_core.models.sd import build_tiny, sd15_scheduler  # noqa: E402
from instaflow_core.models.tokenizer import tiny_tokenizer  # noqa: E402


def lance_compat() -> None:
    """pylance < 1.0 (0.36 is the wheel small enough to carry to a GPU machine) has no LanceDataset.metadata,
    which TripletDataset's default filter reads; the suite's tables carry no metadata, so {} is exact."""
    try:
        import lance
    except ImportError:  # no pylance: the training rows read in-memory batches and say so
        return
    if not hasattr(lance.LanceDataset, "metadata"):
        lance.LanceDataset.metadata = property(lambda ds: {})


# ====================================================================================== presets
@dataclass(frozen=True)
class Preset:
    name: str
    latent: int  # latent side (64 = 512 px)
    gen_batches: tuple[int, ...]  # triplet generation batch sizes (the last is skipped by --quick)
    switch_batch: int  # generation / inference batch of the switch rows
    steps: int  # teacher DPM-Solver++ steps (and SD's steps in the inference comparison)
    guidance: float
    train_micro: int  # the fixed micro-batch of the ours-vs-plain and switch rows (no checkpointing)
    micro_limit: int  # the doubling search stops here
    table_rows: int  # rows of the Lance table the training reads (epochs repeat)
    train_steps: int  # timed optimizer steps per training row (after 2 warm-up steps)
    infer_batches: tuple[int, int]  # latency batch, throughput batch
    latency_calls: int  # timed calls of a one-step latency row


SD15 = Preset("sd15", 64, (16, 32, 64), 16, 25, 5.0, 8, 256, 1024, 5, (1, 16), 20)
TINY = Preset("tiny", 8, (1, 2, 4), 2, 2, 5.0, 2, 1, 16, 2, (1, 4), 3)


def build_components(preset: Preset, device: torch.device | str, seed: int = 0) -> Model:
    """An SD-family Model, float32, random init from `seed`, built directly on `device` ("meta": no memory).

    The tokenizer is the project's tiny CLIP BPE (the first 4000 real merges; the full vocabulary is not shipped
    offline): ids fit SD's 49408-entry embedding, tokenising costs about the same.
    """
    if preset.name == "tiny":
        with torch.device(device):
            comps = build_tiny(TinyModelConfig(seed=seed))
        return comps.to(device)
    from tests.support.sd15 import real_configs
    from tests.support.teacher_repos import write_configs

    folder = write_configs(real_configs(), tempfile.mkdtemp(prefix="gpu-suite-sd15-"))
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = SD.from_configs(folder, skip=("tokenizer", "scheduler"))  # SD 1.5's own configs
    model.parts["tokenizer"] = tiny_tokenizer()
    model.parts["scheduler"] = sd15_scheduler("dpmsolver++")
    return model


# ====================================================================================== main
def plan(args: argparse.Namespace) -> list[tuple[str, Callable[..., None]]]:
    """Every row group, most important first, so the time budget cuts the least useful ones."""
    from suite_family import family_core
    from suite_gen import gen_compile, gen_core, gen_switches
    from suite_infer import infer_compile, infer_core, infer_switches
    from suite_search import train_search
    from suite_train import train_core, train_switches

    compile_b1 = functools.partial(infer_compile, which=0)  # the one-step latency goal needs CUDA graphs
    compile_bn = functools.partial(infer_compile, which=1)
    order = [("gen", gen_core), ("infer", infer_core), ("train", train_core), ("family", family_core),
             ("infer", compile_b1), ("gen", gen_switches), ("train", train_switches), ("infer", infer_switches),
             ("train", train_search), ("gen", gen_compile), ("infer", compile_bn)]  # fmt: skip
    if args.no_compile:
        order = [(sec, fn) for sec, fn in order if fn not in (compile_b1, compile_bn, gen_compile)]
    return [(sec, fn) for sec, fn in order if sec in args.sections.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tiny", action="store_true", help="tiny models on CPU: the suite's own check (~1 minute)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="skip the largest generation batch and micro-batch search"
    )
    ap.add_argument(
        "--time-budget", type=float, default=None, help="seconds (default 440 on a GPU, 120 with --tiny)"
    )
    ap.add_argument("--out", default="benchmarks/out/gpu_suite.json")
    ap.add_argument("--device", default="auto", help="auto: cuda if available (cpu with --tiny)")
    ap.add_argument("--sections", default="gen,infer,train,family")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument(
        "--tiny-compile", action="store_true", help="with --tiny, run the compile rows too (slow here)"
    )
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--print-profiles", action="store_true")
    ap.add_argument("--verbose", "-v", action="store_true", help="print each row as it is measured")
    ap.add_argument(
        "--flops-only",
        action="store_true",
        help="count SD 1.5's FLOPs on the meta device (no memory, any machine) and print predictions",
    )
    args = ap.parse_args(argv)
    if args.time_budget is None:
        # --tiny: ~25 s of CPU time; the budget leaves room for a loaded shared machine
        args.time_budget = 120.0 if args.tiny else 440.0
    return args


def flops_only(args: argparse.Namespace) -> int:
    """SD 1.5 built on the meta device, counted by the same code as the suite; predictions at the goal MFUs."""
    import json

    from suite_gen import State
    from suite_harness import Suite
    from suite_report import predictions, print_predictions
    from suite_train import train_flops

    meta = torch.device("meta")
    s = Suite(args, SD15, meta)
    st = State(s, build_components(SD15, meta, seed=0))
    train_flops(s, st)
    pred = predictions(s.flops)
    print_predictions(s.flops, pred)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"flops": s.flops, "predictions": pred}, indent=1))
    print(f"JSON: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)  # small ops on a shared CPU: one thread is faster (STACK.md)
    from suite_gen import State
    from suite_harness import Suite, free_memory
    from suite_report import goals, print_goals, print_profiles, print_table, write_json

    if args.flops_only:
        return flops_only(args)
    want = "cpu" if args.tiny and args.device == "auto" else args.device
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want)
    lance_compat()
    preset = TINY if args.tiny else SD15
    s = Suite(args, preset, device)
    if args.tiny and not args.tiny_compile:
        s.skip_compile = "--tiny: dynamo's tracing takes 20-50 s a row on this CPU; --tiny-compile runs it"
    print(f"gpu_suite: preset {preset.name} on {s.peak['device']} ({device}), torch {torch.__version__}, "
          f"budget {args.time_budget:.0f}s{', quick' if args.quick else ''}", flush=True)  # fmt: skip
    st = State(s, build_components(preset, device, seed=0))
    print(f"models ready: UNet {sum(p.numel() for p in st.ours.denoiser.parameters()) / 1e6:.0f}M parameters, forward "
          f"{s.flops['unet_forward'] / 1e12:.4g} TFLOP/sample, triplet {s.flops['triplet'] / 1e12:.4g} TFLOP, "
          f"ours: {st.ours_flags}", flush=True)  # fmt: skip
    for _, fn in plan(args):
        fn(s, st)
        free_memory()
    print_table(s)
    gl = goals(s)
    print_goals(s, gl)
    if args.print_profiles:
        print_profiles(s)
    path = write_json(s, gl)
    n_err = sum(r.status == "error" for r in s.rows)
    n_skip = sum(r.status == "skipped" for r in s.rows)
    print(
        f"\n{len(s.rows)} rows ({n_skip} skipped, {n_err} errors) in {time.perf_counter() - s.t0:.1f}s; JSON: {path}"
    )
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
