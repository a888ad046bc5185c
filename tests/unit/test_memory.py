"""Training memory before any work: the formula (training/memory.py), the counts it takes from configs alone
(models/footprint.py: parameters on the meta device, activations on fake tensors) and the preflight rule that names
a plan which cannot fit `reflow.gpu_memory_gb` / `distillation.gpu_memory_gb` (preflight/checks.py), on the
hub-shaped tiny teacher repos with synthetic budgets."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from instaflow_core.config import InstaflowConfig, TrainConfig, load
from instaflow_core.models import footprint
from instaflow_core.models.family import family_of
from instaflow_core.models.sources import model_configs
from instaflow_core.preflight import checks
from instaflow_core.refs import ModelKind, ModelRef, Stage, TableRef
from instaflow_core.training import memory
from instaflow_core.training.job import TrainJob
from tests.support import sd15
from tests.support import teacher_repos as tr

GB = memory.GB


# ------------------------------------------------------------------------------------------------ formula
def test_the_formula_term_by_term() -> None:
    p = 1_000_000_000
    est = memory.estimate(p, 2 * GB, 0.5 * GB, micro_batch=4, gradient_checkpointing=True, frozen_params=10)
    t = est.terms
    assert (t["weights"], t["grads"], t["AdamW"], t["EMA"]) == (4 * p, 4 * p, 8 * p, 4 * p)  # 20 B/param
    assert t["activations"] == 2 * GB + 4 * 0.5 * GB and t["VAE"] == 40 and t["reserve"] == 3 * GB
    assert est.total == sum(t.values()) and est.fits(est.total / GB) and not est.fits(est.total / GB - 0.01)
    assert "DDP buckets" not in t and "gathered blocks" not in t
    assert est.line().startswith(
        f"needs ~{memory.gb(est.total)} GB (weights 3.73 GB, grads 3.73 GB, AdamW 7.45"
    )
    eight = memory.estimate(p, 0, 0, micro_batch=1, gradient_checkpointing=False, use_8bit_adam=True)
    assert eight.terms["8-bit AdamW"] == 2 * p
    ddp = memory.estimate(p, 0, 0, micro_batch=1, gradient_checkpointing=False, processes=4)
    assert ddp.terms["DDP buckets"] == 4 * p and ddp.terms["weights"] == 4 * p  # DDP replicates
    fsdp = memory.estimate(
        p, 0, 0, micro_batch=1, gradient_checkpointing=False, processes=4, fsdp=True, largest_block=1000
    )
    assert fsdp.terms["weights"] == p and fsdp.terms["AdamW"] == 2 * p  # a quarter each
    assert fsdp.terms["gathered blocks"] == 2 * 1000 * (2 + 4) and "DDP buckets" not in fsdp.terms


def test_largest_micro_batch_and_fsdp_processes_agree_with_the_estimate() -> None:
    p, fixed, per = 2_000_000_000, 1 * GB, 0.7 * GB
    kw = dict(gradient_checkpointing=True, batch_bytes_per_sample=1e6)
    m = memory.largest_micro_batch(80, p, fixed, per, **kw)
    assert memory.estimate(p, fixed, per, micro_batch=m, **kw).fits(80)  # type: ignore[arg-type]
    assert not memory.estimate(p, fixed, per, micro_batch=m + 1, **kw).fits(80)  # type: ignore[arg-type]
    assert memory.largest_micro_batch(10, p, fixed, per, **kw) == 0  # 40 GB of state: not one sample
    n = memory.fsdp_processes(80, 12_000_000_000, fixed, per, micro_batch=1, largest_block=340_000_000)
    assert n is not None and 2 < n <= 8
    for k, fits in ((n - 1, False), (n, True)):
        est = memory.estimate(
            12_000_000_000, fixed, per, micro_batch=1, gradient_checkpointing=False, processes=k, fsdp=True,
            largest_block=340_000_000,
        )  # fmt: skip
        assert est.fits(80) is fits


# ------------------------------------------------------------------------------------------ counts from configs
REAL_DENOISERS = {  # the released networks' parameter counts
    sd15.REPO_ID: ("sd", 859_520_964),
    tr.SD21: ("sd", 865_910_724),
    tr.SDXL: ("sdxl", 2_567_463_684),
    tr.SD35_MEDIUM: ("sd3", 2_243_171_520),
    tr.FLUX_DEV: ("flux", 11_901_408_320),
    tr.FLUX_SCHNELL: ("flux", 11_891_178_560),
}


@pytest.fixture(scope="module")
def real_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real-size configs of every teacher, as config-only folders (no weights)."""
    root = tmp_path_factory.mktemp("real_configs")
    return {
        rid: tr.write_configs(tr.real_size_configs(rid), root / rid.replace("/", "--"))
        for rid in REAL_DENOISERS
    }


def test_real_size_configs_give_the_released_parameter_counts_on_the_meta_device(
    real_folders: dict[str, Path],
) -> None:
    for rid, (family_name, n) in REAL_DENOISERS.items():
        index, configs = model_configs(str(real_folders[rid]))
        family = family_of(real_folders[rid])
        assert family.name == family_name
        assert footprint.parameter_count(index, configs, family.denoiser) == n, rid
    index, configs = model_configs(str(real_folders[tr.FLUX_DEV]))
    assert footprint.parameter_count(index, configs, "text_encoder_2") == 4_762_310_656  # T5-XXL's encoder
    assert footprint.largest_block(index, configs, "transformer") == 339_831_296  # one double-stream block


def test_condition_shapes_are_what_the_families_store(real_folders: dict[str, Path]) -> None:
    want = {  # generation/conditions.py's bytes per prompt (float32)
        sd15.REPO_ID: {"embeds": (77, 768)},
        tr.SDXL: {"embeds": (77, 2048), "pooled": (1280,)},
        tr.SD35_MEDIUM: {"embeds": (333, 4096), "pooled": (2048,)},
        tr.FLUX_DEV: {"embeds": (512, 4096), "pooled": (768,)},
        tr.FLUX_SCHNELL: {"embeds": (256, 4096), "pooled": (768,)},
    }
    for rid, shapes in want.items():
        _, configs = model_configs(str(real_folders[rid]))
        assert family_of(real_folders[rid]).condition_shapes(configs) == shapes, rid


@pytest.mark.parametrize("repo_id", [tr.SDXL, tr.FLUX_DEV, tr.SD35_MEDIUM])
def test_fake_tensor_activation_count_equals_a_real_forward(
    repo_id: str, teacher_repo: Callable[[str], Path]
) -> None:
    """Counted on fake tensors ~ the bytes a real bf16-autocast forward of the same (tiny) network saves."""
    folder = teacher_repo(repo_id)
    index, configs = model_configs(str(folder))
    family = family_of(folder)
    shape = family.geometry(configs).latent_shape(64)
    counted = footprint.count_activations(family, index, configs, shape, mixed_precision="bf16")
    parts = tuple(
        c for c in (*family.required, *family.optional) if c != family.denoiser and c != "scheduler"
    )
    net = family.from_configs(folder, skip=parts).denoiser.train().requires_grad_(True)
    cond_shapes = family.condition_shapes(configs)
    real = [footprint.saved_activations(family, net, cond_shapes, shape, b) for b in (1, 2)]
    for b, got in ((1, real[0]), (2, real[1])):  # within 1% (fake and real kernels may share a storage less)
        assert abs(counted.at(b) - got) <= 0.01 * got, (counted, real)
    with_gc = footprint.count_activations(
        family, index, configs, shape, mixed_precision="bf16", gradient_checkpointing=True
    )
    fp32 = footprint.count_activations(family, index, configs, shape, mixed_precision="no")
    assert with_gc.per_sample < counted.per_sample and fp32.per_sample > counted.per_sample


# ------------------------------------------------------------------------------------------------ preflight
def _cfg(tmp_path: Path, preset: str, teacher: Path, *sets: str) -> InstaflowConfig:
    return load(preset, [f"storage.root=file://{tmp_path / 'store'}", f"models.teacher={teacher}", *sets])


def _plan(cfg: InstaflowConfig, section: TrainConfig, *, gc: bool, micro: int) -> memory.MemoryEstimate:
    """The estimate the rule makes, recomputed here from the same counts."""
    index, configs = model_configs(cfg.models.teacher)
    family = family_of(Path(cfg.models.teacher))
    shape = family.geometry(configs).latent_shape(cfg.generation.resolution)
    acts = footprint.count_activations(
        family, index, configs, shape, mixed_precision=section.mixed_precision, gradient_checkpointing=gc
    )
    return memory.estimate(
        footprint.parameter_count(index, configs, family.denoiser), acts.fixed, acts.per_sample,
        micro_batch=micro, gradient_checkpointing=gc, mixed_precision=section.mixed_precision,
        frozen_params=footprint.parameter_count(index, configs, "vae"),
        batch_bytes_per_sample=footprint.condition_bytes(family, configs) + 16 * shape[0] * shape[1] * shape[2],
    )  # fmt: skip


SETS = (
    "generation.resolution=64",
    "reflow.stages=[{steps: 1, batch_size: 8, micro_batch_size: 4}]",
    "reflow.gradient_checkpointing=false",
)


def test_no_budget_no_check_and_a_budget_that_fits_passes(sdxl_folder: Path, tmp_path: Path) -> None:
    assert checks.memory_problems(_cfg(tmp_path, "sdxl", sdxl_folder, *SETS)) == []
    assert checks.memory_problems(_cfg(tmp_path, "sdxl", sdxl_folder, *SETS, "reflow.gpu_memory_gb=80")) == []


def test_a_plan_over_budget_is_one_line_naming_the_terms_and_the_fixes(
    sdxl_folder: Path, tmp_path: Path
) -> None:
    cfg = _cfg(tmp_path, "sdxl", sdxl_folder, *SETS)
    no_gc = _plan(cfg, cfg.reflow, gc=False, micro=4)
    with_gc = _plan(cfg, cfg.reflow, gc=True, micro=4)
    one = _plan(cfg, cfg.reflow, gc=False, micro=1)
    assert with_gc.total < no_gc.total and one.total < no_gc.total
    budget = (max(with_gc.total, one.total) + no_gc.total) / 2 / GB  # between: both fixes fit, the plan not
    (line,) = checks.memory_problems(
        _cfg(tmp_path, "sdxl", sdxl_folder, *SETS, f"reflow.gpu_memory_gb={budget}")
    )
    assert line.startswith(f"reflow on {budget:g} GB: needs ~{memory.gb(no_gc.total)} GB (weights ")
    for term in ("grads", "AdamW", "EMA", "activations", "VAE", "reserve"):
        assert f" {term} " in line, term
    assert "at micro-batch 4, without gradient checkpointing" in line and "\n" not in line
    assert "turn on reflow.gradient_checkpointing" in line
    assert re.search(r"lower micro_batch_size to [123]\b", line)
    assert "use FSDP over 2 GPUs (reflow.fsdp.enabled=true, num_processes=2" in line


def test_state_over_budget_asks_for_fsdp_and_distillation_is_checked_too(
    flux_dev_folder: Path, tmp_path: Path
) -> None:
    sets = (
        "generation.resolution=64",
        "distillation.pairs.resolution=64",
        "distillation.stages=[{steps: 1, batch_size: 1}]",
        "distillation.gradient_checkpointing=true",
    )
    cfg = _cfg(tmp_path, "flux-dev", flux_dev_folder, *sets)
    est = _plan(cfg, cfg.distillation, gc=True, micro=1)
    state = sum(v for k, v in est.terms.items() if k in ("weights", "grads", "AdamW", "EMA"))
    budget = (est.total - state / 3) / GB  # FSDP over a few GPUs fits, nothing on one GPU does
    problems = checks.memory_problems(
        _cfg(tmp_path, "flux-dev", flux_dev_folder, *sets, f"distillation.gpu_memory_gb={budget}")
    )
    (line,) = problems
    assert line.startswith(f"distillation on {budget:g} GB: needs ~{memory.gb(est.total)} GB")
    assert "flux student" in line and "lower micro_batch_size" not in line and "turn on" not in line
    assert re.search(
        r"use FSDP over [2-4] GPUs \(distillation\.fsdp\.enabled=true, num_processes=[2-4]\)", line
    )


def test_the_budget_does_not_change_the_stage_key_or_old_dumps() -> None:
    section = TrainConfig(stages=[{"steps": 1, "batch_size": 1}])
    budgeted = section.model_copy(update={"gpu_memory_gb": 80.0})
    assert "gpu_memory_gb" not in section.model_dump() and budgeted.model_dump()["gpu_memory_gb"] == 80.0
    data, base = (
        TableRef(db_uri="/tmp/s", table="triplets", version=1),
        ModelRef(uri="/tmp/teacher", kind=ModelKind.TEACHER),
    )
    key = TrainJob.stage_key(Stage.REFLOW, data, base, section)
    assert TrainJob.stage_key(Stage.REFLOW, data, base, budgeted) == key  # resumes, does not retrain


def test_the_preflight_runs_the_rule_for_reflow_and_distill(sdxl_folder: Path, tmp_path: Path) -> None:
    from tasks.preflight import run_preflight

    cfg = _cfg(tmp_path, "sdxl", sdxl_folder, *SETS, "reflow.gpu_memory_gb=0.5")
    report = run_preflight(cfg, [Stage.REFLOW])
    memory_result = next(r for r in report.results if r.name == "memory")
    assert len(memory_result.problems) == 1 and memory_result.problems[0].startswith("reflow on 0.5 GB: ")
    assert "nothing here fits it" in memory_result.problems[0]  # below the 3 GB reserve


def test_teachers_without_configs_are_not_estimated(tmp_path: Path) -> None:
    cfg = load("tiny", [f"storage.root=file://{tmp_path}/store", "reflow.gpu_memory_gb=0.001"])
    assert checks.memory_problems(cfg) == []
    with tempfile.TemporaryDirectory() as d:  # an unreadable teacher: the teacher check names it
        cfg = load(
            "tiny", [f"storage.root=file://{tmp_path}/store", f"models.teacher={d}", "reflow.gpu_memory_gb=1"]
        )
        assert checks.memory_problems(cfg) == []


# ------------------------------------------------------------------------------------------------ benchmark
def test_the_saved_footprint_runs_reprint_and_still_match_the_count() -> None:
    """benchmarks/results/footprint-*.json reprint with --report, and today's count of SD 1.5 at 512 px is the
    one they hold (the docs' numbers come from it)."""
    import json
    import subprocess
    import sys

    from tests.support import REPO

    saved = REPO / "benchmarks" / "results"
    proc = subprocess.run(
        [sys.executable, "benchmarks/footprint.py", "--report", str(saved / "footprint-flux-dev.json")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "FSDP over 4 GPUs" in proc.stdout and "2.240 / 2.240 GB" in proc.stdout
    count = json.loads((saved / "footprint-sd15.json").read_text())["count"]
    with tempfile.TemporaryDirectory() as d:
        folder = tr.write_configs(tr.real_size_configs(sd15.REPO_ID), d)
        index, configs = model_configs(str(folder))
        family = family_of(folder)
        acts = footprint.count_activations(family, index, configs, (4, 64, 64), gradient_checkpointing=True)
    assert {"fixed": acts.fixed, "per_sample": acts.per_sample} == count["activations_native"]["gc/bf16"]
