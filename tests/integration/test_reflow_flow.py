"""Stage 3 end to end on the tiny preset: reflow_flow trains the 2-RF from a real triplets table, checkpoints,
caches, logs to MLflow, writes a folder InstaFlowPipeline loads; bad tables fail before training.

The helpers here (`tiny_cfg`, `make_inputs`) are shared by the distillation and kill tests.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.curate import curate_flow
from flows.generate import generate_flow
from flows.reflow import reflow_flow
from instaflow_core.config import InstaflowConfig, StorageConfig, load
from instaflow_core.errors import DataError, TrainingError
from instaflow_core.models.family import STAGE_META
from instaflow_core.refs import ModelRef, Stage, TableRef
from instaflow_core.store import Store
from instaflow_core.training.job import TrainJob
from tasks.caching import prefect_settings
from tasks.teacher import teacher_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFLOW_STEPS = 6
# One MLflow sqlite db per test session: creating one runs ~100 alembic migrations (seconds on a busy machine).
MLFLOW_DIR = Path(tempfile.gettempdir()) / f"instaflow-test-mlflow-{os.getpid()}"
atexit.register(shutil.rmtree, MLFLOW_DIR, True)


def tiny_cfg(storage: StorageConfig, overrides: list[str] | None = None) -> InstaflowConfig:
    """The tiny preset shrunk for tests: 6 prompts x 2 images, a few optimizer steps, MLflow in a temp db."""
    sets = [
        "curation.max_prompts=6",
        "curation.holdout_fraction=0.0",
        "generation.images_per_prompt=2",
        "generation.num_inference_steps=2",
        f"reflow.stages=[{{steps: {REFLOW_STEPS}, batch_size: 4, loss: l2}}]",
        "reflow.checkpoint_every=3",
        "reflow.log_every=2",
        "reflow.warmup_steps=1",
        "reflow.sample_steps=2",
        "distillation.stages=[{steps: 4, batch_size: 4, loss: l2}]",
        "distillation.checkpoint_every=2",
        "distillation.log_every=2",
        "distillation.warmup_steps=1",
        "distillation.pairs.num_inference_steps=2",
        f"registration.tracking_uri=sqlite:///{MLFLOW_DIR / 'mlflow.db'}",
        *(overrides or []),
    ]
    data = load("tiny", sets).model_dump(mode="json")
    data["storage"] = storage.model_dump(mode="json")
    return InstaflowConfig.model_validate(data)


def make_inputs(cfg: InstaflowConfig) -> tuple[TableRef, TableRef, ModelRef]:
    """Curate -> teacher -> triplets through the real upstream flows: (prompts, triplets, teacher)."""
    with prefect_settings(cfg.storage, cfg.orchestration):
        prompts = curate_flow(cfg)
        teacher = teacher_model(cfg.models, cfg.storage)
        triplets = generate_flow(cfg, prompts, teacher)
    return prompts, triplets, teacher


def folder_pipeline(store: Store, uri: str):
    """diffusers' pipeline over a saved folder (what users of the SD family's students load)."""
    from instaflow_core.inference.pipeline import InstaFlowPipeline

    pipe = InstaFlowPipeline.from_pretrained(str(store.local_copy(uri)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mlflow_run(cfg: InstaflowConfig, run_id: str):
    from mlflow import MlflowClient

    from tasks.tracking.client import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(cfg.registration, cfg.storage))
    return client, client.get_run(run_id)


@pytest.fixture(scope="module")
def local_inputs(prefect_api, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reflow")
    storage = StorageConfig(root=f"file://{tmp / 'store'}")
    cfg = tiny_cfg(storage)
    return cfg, *make_inputs(cfg)


def test_reflow_flow_local_end_to_end_cache_and_resume(local_inputs):
    cfg, _prompts, triplets, teacher = local_inputs
    with prefect_settings(cfg.storage, cfg.orchestration):
        rf = reflow_flow(cfg, triplets, teacher, mlflow_parent_run_id=None)
    store = Store(cfg.storage)
    job = TrainJob.make(Stage.REFLOW, cfg.reflow, cfg.storage, triplets, teacher)
    assert rf.kind == "2rf" and store.resolve(rf.uri) == job.out_uri and rf.source == f"2rf-{job.key}"
    assert rf.uri.startswith("store://models/2rf-")  # store-relative: a moved store still resolves it

    # checkpoints every 3 steps + the end; the folder is the teacher's with the EMA UNet
    names = [u.rsplit("/", 1)[-1] for u in store.ls(job.ckpt_dir)]
    assert "latest" in names and f"step-{REFLOW_STEPS:09d}" in names
    meta = json.loads(store.read_bytes(f"{rf.uri}/{STAGE_META}"))
    assert meta["weights"] == "ema" and meta["steps"] == REFLOW_STEPS and meta["kind"] == "2rf"
    teacher_dir, rf_dir = store.local_copy(teacher.uri), store.local_copy(rf.uri)
    assert (teacher_dir / "vae/diffusion_pytorch_model.safetensors").read_bytes() == (
        rf_dir / "vae/diffusion_pytorch_model.safetensors"
    ).read_bytes()
    assert (teacher_dir / "unet/diffusion_pytorch_model.safetensors").read_bytes() != (
        rf_dir / "unet/diffusion_pytorch_model.safetensors"
    ).read_bytes()

    # the folder loads in the one-step / N-step pipeline and generates
    pipe = folder_pipeline(store, rf.uri)
    out = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=1.5, output_type="np").images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()

    # summary, sample grid, MLflow run with per-step metrics and the grid as an artifact
    summary = job.summary()
    assert summary["steps"] == REFLOW_STEPS and summary["start_step"] == 0
    assert [r["step"] for r in summary["history"]] == [2, 4, 6]
    assert store.exists(job.samples_uri)
    client, run = mlflow_run(cfg, summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["instaflow.stage"] == "reflow"
    assert run.data.params["stages.0.steps"] == str(REFLOW_STEPS)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [2, 4, 6] and all(np.isfinite(m.value) for m in losses)
    for key in ("lr", "grad_norm", "samples_per_s", "data_wait_share"):
        assert key in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts == ["samples/samples_2step.png"]

    # rerun with the same inputs: a Prefect cache hit, no new training (the model folder is untouched)
    stamp = store.fs.info(store.fs_path(f"{rf.uri}/unet/config.json"))["mtime"]
    with prefect_settings(cfg.storage, cfg.orchestration):
        again = reflow_flow(cfg, triplets, teacher)
    assert again == rf
    assert store.fs.info(store.fs_path(f"{rf.uri}/unet/config.json"))["mtime"] == stamp

    # a refreshed cache (the rebuild's --refresh) with the same key: resumes at the finished checkpoint,
    # trains nothing, re-saves the folder and continues the same MLflow run
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    with (
        prefect_settings(cfg.storage, cfg.orchestration),
        temporary_settings({PREFECT_TASKS_REFRESH_CACHE: True}),
    ):
        rerun = reflow_flow(cfg, triplets, teacher)
    assert rerun == rf
    summary2 = job.summary()
    assert summary2["start_step"] == REFLOW_STEPS and summary2["steps"] == REFLOW_STEPS
    assert summary2["mlflow_run_id"] == summary["mlflow_run_id"]  # the same run continued


def test_reflow_nested_run_and_pseudo_huber(local_inputs):
    """A new section (pseudo-Huber loss, two stages): a new key, a run nested under the given parent."""
    cfg, _prompts, triplets, teacher = local_inputs
    from mlflow import MlflowClient

    from tasks.tracking.client import ensure_experiment, tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(cfg.registration, cfg.storage))
    parent = client.create_run(ensure_experiment(client, cfg.registration.experiment)).info.run_id
    data = cfg.model_dump(mode="json")
    data["reflow"]["stages"] = [
        {"steps": 2, "batch_size": 4, "loss": "pseudo_huber"},
        {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "loss": "l2"},
    ]
    cfg2 = InstaflowConfig.model_validate(data)
    with prefect_settings(cfg2.storage, cfg2.orchestration):
        rf = reflow_flow(cfg2, triplets, teacher, mlflow_parent_run_id=parent)
    summary = TrainJob.make(Stage.REFLOW, cfg2.reflow, cfg2.storage, triplets, teacher).summary()
    assert summary["steps"] == 4 and rf.source.endswith(summary["model_uri"].rsplit("2rf-", 1)[-1])
    _, run = mlflow_run(cfg2, summary["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert [r["stage"] for r in summary["history"]] == [0, 1]


def test_reflow_rejects_wrong_latent_shape_before_training(local_inputs):
    """The table's 4x8x8 latents were made at 16 px; a teacher whose VAE is x4 makes 4x4x4 latents at 16 px:
    DataError naming both shapes before any training, nothing written."""
    cfg, _prompts, triplets, _teacher = local_inputs
    other = cfg.model_copy(deep=True)
    other.models.tiny.vae_channels = [32, 64, 64]
    with prefect_settings(other.storage, other.orchestration):
        x4_teacher = teacher_model(other.models, other.storage)
        with pytest.raises(DataError, match=r"\(4, 8, 8\) made at 16 px.*\(4, 4, 4\)"):
            reflow_flow(other, triplets, x4_teacher)
    job = TrainJob.make(Stage.REFLOW, other.reflow, other.storage, triplets, x4_teacher)
    store = Store(other.storage)
    assert not store.exists(f"{job.ckpt_dir}/latest") and not store.exists(job.out_uri)


def test_reflow_takes_a_table_at_another_resolution(local_inputs):
    """SD UNets run at any size their down-sampling divides: a teacher configured for 4x4 latents (8 px) trains
    on a 16 px table (its 8x8 latents); a table whose latents the UNet cannot divide is refused."""

    cfg, _prompts, triplets, _teacher = local_inputs
    other = cfg.model_copy(deep=True)
    other.models.tiny.sample_size = 4
    with prefect_settings(other.storage, other.orchestration):
        small_teacher = teacher_model(other.models, other.storage)
    assert TrainJob.make(
        Stage.REFLOW, other.reflow, other.storage, triplets, small_teacher
    ).check_inputs() == (
        4,
        8,
        8,
    )
    deep = cfg.model_copy(deep=True)
    deep.models.tiny.unet_channels = [32, 32, 32, 32, 64]  # down-sampling by 16: 8x8 latents do not divide
    with prefect_settings(deep.storage, deep.orchestration):
        deep_teacher = teacher_model(deep.models, deep.storage)
    with pytest.raises(DataError, match="cannot run at that size"):
        TrainJob.make(Stage.REFLOW, deep.reflow, deep.storage, triplets, deep_teacher).check_inputs()


def test_reflow_rejects_empty_table(local_inputs):
    cfg, _prompts, triplets, teacher = local_inputs
    from instaflow_core.generation.triplets import triplet_schema
    from instaflow_core.store import create_table, table_ref

    store = Store(cfg.storage)
    create_table(store, "empty_triplets", triplet_schema((4, 8, 8)), metadata={})
    empty = table_ref(store, "empty_triplets")
    job = TrainJob.make(Stage.REFLOW, cfg.reflow, cfg.storage, empty, teacher)
    with pytest.raises(DataError, match="empty|no rows|0 rows"):
        job.check_inputs()


def test_non_finite_loss_names_step_and_checkpoint(local_inputs):
    """lr = 1e30 blows the weights up: one TrainingError line with the step and the last good checkpoint."""
    cfg, _prompts, triplets, teacher = local_inputs

    section = cfg.reflow.model_copy(
        update={
            "lr": 1e30,
            "warmup_steps": 0,
            "grad_clip": None,
            "checkpoint_every": 1,
            "stages": cfg.reflow.stages,
        }
    )
    job = TrainJob.make(Stage.REFLOW, section, cfg.storage, triplets, teacher)
    torch.manual_seed(0)
    with pytest.raises(TrainingError) as info:
        job.run()
    msg = str(info.value)
    assert "non-finite" in msg and "at step" in msg and "last good checkpoint" in msg
    assert "\n" not in msg


@pytest.mark.slow
def test_reflow_two_processes_through_accelerate_launch(local_inputs):
    """num_processes=2: the task launches `accelerate launch -m instaflow_core.training.entry` (gloo on CPU), relays the
    main process's records to MLflow and gets the same kind of folder back."""
    cfg, _prompts, triplets, teacher = local_inputs
    data = cfg.model_dump(mode="json")
    data["reflow"].update(num_processes=2, stages=[{"steps": 2, "batch_size": 4, "loss": "l2"}], log_every=1)
    cfg2 = InstaflowConfig.model_validate(data)
    with prefect_settings(cfg2.storage, cfg2.orchestration):
        rf = reflow_flow(cfg2, triplets, teacher)
    summary = TrainJob.make(Stage.REFLOW, cfg2.reflow, cfg2.storage, triplets, teacher).summary()
    assert summary["steps"] == 2 and [r["step"] for r in summary["history"]] == [1, 2]
    client, run = mlflow_run(cfg2, summary["mlflow_run_id"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    pipe = folder_pipeline(Store(cfg2.storage), rf.uri)
    assert pipe("a cat", num_inference_steps=1, output_type="np").images.shape == (1, 16, 16, 3)


def test_batch_factory_resumes_at_the_same_batch(local_inputs):
    """The data position after a resume: starting at micro-batch k yields what the uninterrupted stream yields
    from k on, across an epoch boundary; ranks read disjoint rows."""
    cfg, _prompts, triplets, _teacher = local_inputs
    from instaflow_core.training import BatchRequest
    from instaflow_core.training.job import triplet_batches

    factory = triplet_batches(triplets, cfg.storage)
    stage = cfg.reflow.stages[0]

    def take(start: int, n: int, rank: int = 0, world: int = 1) -> list[list[str]]:
        it = iter(factory(BatchRequest(0, stage, 2, start, rank, world, cfg.reflow.seed)))
        return [next(it)["triplet_id"] for _ in range(n)]

    full = take(0, 10)  # 12 rows / 2 per batch = 6 per epoch: crosses into epoch 2
    assert take(4, 6) == full[4:] and take(7, 3) == full[7:]
    assert sorted(sum(full[:6], [])) == sorted(set(sum(full[:6], [])))  # an epoch sees each row once
    assert full[:6] != full[6:10] + full[:2]  # a new permutation per epoch
    r0, r1 = take(0, 3, 0, 2), take(0, 3, 1, 2)
    assert not set(sum(r0, [])) & set(sum(r1, []))


def test_init_from_any_weights_layout(tmp_path):
    """reflow.init_from accepts a diffusers folder, a UNet folder, a .safetensors file or a checkpoint folder."""
    from safetensors.torch import save_file

    from instaflow_core.models.sd import build_tiny
    from instaflow_core.training.student import load_denoiser_weights, load_student

    base = build_tiny()
    base.save(tmp_path / "base")
    other = build_tiny(load("tiny").models.tiny.model_copy(update={"seed": 7}))  # different weights
    other.save(tmp_path / "other")
    want = other.denoiser.state_dict()
    save_file({f"unet.{k}": v.contiguous() for k, v in want.items()}, str(tmp_path / "ema.safetensors"))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "ema.safetensors").write_bytes((tmp_path / "ema.safetensors").read_bytes())
    for source in ("other", "other/unet", "ema.safetensors", "ckpt"):
        model = load_student(tmp_path / "base", tmp_path / source)
        got = model.denoiser.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), source
    wrong = build_tiny(load("tiny").models.tiny.model_copy(update={"unet_channels": [32, 32]}))
    with pytest.raises(DataError, match="do not fit"):
        load_denoiser_weights(wrong.denoiser, tmp_path / "other")
    with pytest.raises(DataError, match="not found"):
        load_denoiser_weights(wrong.denoiser, tmp_path / "missing")
