"""The models of the training stages: the student built from its teacher, its loss functions, its saved folder.

- `load_student(base_folder, init_from)`: the base model's components (2-RF's teacher, or the 2-RF for
  distillation) with the UNet optionally replaced by `init_from` (a diffusers folder, a UNet folder, a
  .safetensors state dict, or a training checkpoint folder whose EMA weights are taken).
- `StudentVelocity`: the UNet with `UNetVelocity`'s forward and no text encoder inside, so DDP, the EMA copy
  and the checkpoints carry the UNet alone (for SD 1.5 the text encoder would add 123M frozen parameters to
  every checkpoint and EMA update).
- `PromptEmbeddings`: text embeddings from the frozen encoder, computed per batch and cached per prompt.
- `reflow_batch_loss` / `distill_batch_loss`: `loss_fn(model, batch)` for the training loop, the stage's
  loss kind read from `batch["stage"].loss` (the training loop puts the stage config there).
- `save_stage_folder(base_folder, unet, out)`: the final model = the base folder with the new UNet (EMA
  weights: the paper evaluates the EMA), the layout the released InstaFlow / 2-RF folders use.
- the final sample grid: `inference.images.sample_images` tiled by `image_grid`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from instaflow_core.config import DistillationConfig, ModelsConfig, StorageConfig, TrainConfig, stable_hash
from instaflow_core.errors import DataError
from instaflow_core.inference.images import image_grid, png_bytes, sample_images
from instaflow_core.models.components import SDComponents
from instaflow_core.models.geometry import Geometry
from instaflow_core.models.sources import local_model_path, model_geometry
from instaflow_core.models.velocity import StudentVelocity
from instaflow_core.refs import TRAINED_KIND, ModelKind, ModelRef, Stage, TableRef
from instaflow_core.store import Store
from instaflow_core.training.losses import distill_batch_loss, reflow_batch_loss
from instaflow_core.training.student import (
    SCRATCH,
    PromptEmbeddings,
    fresh_weights,
    load_student,
    save_stage_folder,
)

EVENT_PREFIX = (
    "INSTAFLOW_EVENT "  # stdout lines of instaflow_core.training.entry that the launching task relays
)


# ------------------------------------------------------------------------------------------ the student


# ------------------------------------------------------------------------------------------ text embeddings


# ------------------------------------------------------------------------------------------ saving


# ------------------------------------------------------------------------------------------ sample grids


# ------------------------------------------------------------------------------------------ a stage's job
class TrainJob(BaseModel):
    """Everything one training stage needs, as JSON: what the Prefect task runs in process, or hands to
    `accelerate launch -m instaflow_core.training.entry <job.json>` on every process when training is distributed.

    `section` is the stage's config section (TrainConfig for reflow, DistillationConfig for distill) as a dict.
    """

    model_config = ConfigDict(extra="forbid")

    stage: Literal["pretrain", "reflow", "distill"]
    key: str  # hash of the inputs and the section: names the checkpoint and model folders
    section: dict[str, Any]
    storage: StorageConfig
    data: TableRef  # triplets (reflow), distill_pairs (distill) or prompts (pretrain: its image table's captions)
    base: ModelRef  # the model the student starts from and whose folder the result copies
    ckpt_dir: str
    out_uri: str
    samples_uri: str
    # how an external base (a hub id teacher) resolves, and models.save_variants; not part of the stage's key
    models: ModelsConfig = Field(default_factory=ModelsConfig)

    def train_cfg(self) -> TrainConfig:
        return (DistillationConfig if self.stage == "distill" else TrainConfig).model_validate(self.section)

    @property
    def out_kind(self) -> ModelKind:
        return TRAINED_KIND[Stage(self.stage)]

    def sample_settings(self) -> tuple[int, float]:
        """(steps, guidance) of the final sample grid: the one-step model is shown at 1 step, no guidance."""
        cfg = self.train_cfg()
        return (1, 1.0) if self.stage == "distill" else (cfg.sample_steps, cfg.sample_guidance)


def _local(job: TrainJob, uri: str, kind: str = "init") -> Path:
    """A local folder for the job's base model or init_from (sources.local_model_path: hub ids, s3://, paths)."""
    return local_model_path(uri, job.storage, job.models, kind=kind)


def check_latents(job: TrainJob) -> tuple[tuple[int, int, int], Geometry]:
    """The table's latent shape, checked against the base model at the resolution the table was made at."""
    from instaflow_core.store.dataset import table_latents

    geometry = model_geometry(job.base.uri, job.storage, job.models, kind=str(job.base.kind))
    shape, resolution = table_latents(job.data, job.storage)
    if resolution is not None:
        problem = geometry.problem(resolution, "that size")
        want = None if problem else geometry.latent_shape(resolution)
        if problem or tuple(shape) != want:
            why = f"cannot run at that size ({problem})" if problem else f"makes {want} at that resolution"
            raise DataError(
                f"triplets table {job.data.key()} holds latents of shape {tuple(shape)} made at {resolution} px, "
                f"but the model {job.base.uri} {why}: generate triplets with this teacher"
            )
    problem = geometry.latent_problem(tuple(shape))
    if problem:
        raise DataError(f"triplets table {job.data.key()} does not fit the model {job.base.uri}: {problem}")
    return tuple(int(s) for s in shape), geometry  # type: ignore[return-value]


def job_latents(job: TrainJob) -> tuple[tuple[int, int, int], Geometry]:
    """The latent shape the job trains on: the table's (checked against the base model), or for pretraining,
    whose data are images, the base model's native one."""
    if job.stage == "pretrain":
        geometry = model_geometry(job.base.uri, job.storage, job.models, kind=str(job.base.kind))
        return geometry.latent_shape(None), geometry
    return check_latents(job)


def check_job_inputs(job: TrainJob) -> tuple[int, int, int]:
    """Fail before any training when the table is empty or its latents do not fit the base model."""
    from instaflow_core.store.dataset import validate_triplets

    cfg = job.train_cfg()
    if job.stage == "pretrain":
        from instaflow_core.training.pretrain import check_pretrain_inputs

        need = max((st.micro_batch_size or st.batch_size // cfg.num_processes) for st in cfg.stages)
        check_pretrain_inputs(job.data, job.storage, need)
        return job_latents(job)[0]
    rows = validate_triplets(job.data, job.storage, None)
    shape, _ = check_latents(job)
    for i, st in enumerate(cfg.stages):
        need = (st.micro_batch_size or st.batch_size // cfg.num_processes) * cfg.num_processes
        if rows < need:
            raise DataError(
                f"{job.data.key()} has {rows} rows, fewer than one micro-batch per process of {job.stage}.stages.{i} "
                f"({need}): lower its batch_size / micro_batch_size or make more {job.data.table}"
            )
    return shape


def resume_step(job: TrainJob) -> int:
    """The optimizer step the newest checkpoint in the job's ckpt_dir holds (0 = none)."""
    from instaflow_core.training import Checkpointer

    name = Checkpointer(job.ckpt_dir, Store(job.storage)).latest()
    return int(name.rsplit("-", 1)[-1]) if name else 0


def triplet_batches(table: TableRef, storage: StorageConfig) -> Callable[[Any], Iterator[dict]]:
    """A batch factory for `training.train`: this rank's shuffled micro-batches of the table, epoch after epoch.

    Each (stage, epoch) gets its own permutation (`TripletDataset` shuffles with [seed, epoch]); short last
    batches are dropped so every step sees the configured batch size. Resuming at micro-batch `req.start`
    skips whole epochs arithmetically and reads only the remainder of the current one.
    """
    from instaflow_core.store.dataset import TripletDataset

    def factory(req: Any) -> Iterator[dict]:
        ds = TripletDataset(
            table,
            storage,
            req.micro_batch_size,
            rank=req.rank,
            world_size=req.world_size,
            shuffle=True,
            seed=int(stable_hash([req.seed, req.stage_index]), 16) & 0x7FFFFFFF,
            drop_last=True,
        )
        # Ranks are dealt whole blocks of rows (64 by default): on a small table use smaller blocks, so every
        # rank gets a share (at least ~4 blocks each).
        ds.block_rows = max(1, min(ds.block_rows, ds.num_rows // (4 * req.world_size)))
        per_epoch = len(ds)
        if per_epoch == 0:
            raise DataError(
                f"{table.key()}: fewer than {req.micro_batch_size} rows for rank {req.rank} of {req.world_size} "
                f"({ds.num_rows} rows in all): lower the stage's batch_size or make more triplets"
            )
        epoch, skip = divmod(req.start, per_epoch)
        while True:
            ds.set_epoch(epoch)
            for batch in ds:
                if skip:
                    skip -= 1
                    continue
                yield batch
            epoch += 1

    return factory


def run_train_job(
    job: TrainJob,
    *,
    accelerator: Any = None,
    on_log: Callable[[dict], None] | None = None,
    validate: bool = True,
) -> dict[str, Any]:
    """Train the stage's student (resuming from its checkpoints), then, on the main process, write the final
    diffusers folder (EMA weights) and a sample grid PNG to the store. Returns a JSON-able summary."""
    from instaflow_core.training import make_accelerator, train
    from instaflow_core.training.lpips import build_lpips, lpips_distance, vae_decoder

    cfg = job.train_cfg()
    store = Store(job.storage)
    if validate:
        check_job_inputs(job)
    start = resume_step(job)
    acc = accelerator or make_accelerator(cfg)
    shape, geometry = job_latents(job)  # the latents trained on: the grid below and the saved UNet use them
    base_dir = _local(job, job.base.uri, kind=str(job.base.kind))
    scratch = cfg.init_from == SCRATCH
    init_dir = _local(job, cfg.init_from) if cfg.init_from and not scratch else None
    comps = load_student(base_dir, init_dir)  # float32 master weights; bf16 is autocast (cfg.mixed_precision)
    if (
        scratch
    ):  # the base model's architecture with fresh weights (seeded): e.g. a 2-RF not started from its teacher
        comps.unet = fresh_weights(comps.unet, cfg.seed)
    comps.text_encoder.to(acc.device)
    comps.vae.to(acc.device)
    student = StudentVelocity.from_components(comps)
    embed = PromptEmbeddings(comps.text_encoder, comps.tokenizer)
    if job.stage in ("reflow", "pretrain"):
        loss_fn = reflow_batch_loss(embed, cfg.t_schedule, cfg.huber_c, cfg.seed, cfg.caption_dropout)
    else:
        wants_lpips = any(st.loss == "lpips" for st in cfg.stages)
        lpips_net = build_lpips(cfg.lpips_weights).to(acc.device) if wants_lpips else None
        loss_fn = distill_batch_loss(
            embed,
            cfg.huber_c,
            decode=vae_decoder(comps.vae) if wants_lpips else None,
            lpips=lpips_distance(lpips_net) if lpips_net is not None else None,
            caption_dropout=cfg.caption_dropout,
        )
    if job.stage == "pretrain":  # (caption, image) pairs with independent noise, not triplets
        from instaflow_core.training.pretrain import image_batches

        batches = image_batches(job.data, job.storage, comps.vae, shape, cfg.seed)
    else:
        batches = triplet_batches(job.data, job.storage)
    result = train(
        student,
        batches,
        loss_fn,
        cfg,
        job.ckpt_dir,
        store=store,
        accelerator=acc,
        on_log=on_log,
    )
    summary: dict[str, Any] = {
        "start_step": start,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "checkpoint": result.checkpoint,
        "history": result.history,
        "model_uri": job.out_uri,
        "samples_uri": job.samples_uri,
        "embedding_cache": {"hits": embed.hits, "misses": embed.misses},
    }
    if acc.is_main_process:
        ema_unet = result.ema_model.unet  # the EMA weights are the stage's model (what the paper evaluates)
        meta = {
            "kind": job.out_kind,
            "stage": job.stage,
            "key": job.key,
            "steps": result.steps,
            "base": job.base.key(),
            "data": job.data.key(),
            "weights": "ema",
            "ema_decay": cfg.ema_decay,
            "checkpoint": result.checkpoint,
        }
        with tempfile.TemporaryDirectory(prefix="instaflow-stage-") as tmp:
            folder = save_stage_folder(
                base_dir, ema_unet, Path(tmp) / "model", meta,
                variants=job.models.save_variants, sample_size=shape[-2],
            )  # fmt: skip
            store.put_dir(folder, job.out_uri, clean=True)
        steps, guidance = job.sample_settings()
        prompts = list(cfg.sample_prompts)
        seeds = list(range(len(prompts)))
        final = SDComponents(
            unet=ema_unet.eval(),
            vae=comps.vae,
            text_encoder=comps.text_encoder,
            tokenizer=comps.tokenizer,
            scheduler=comps.scheduler,
        )
        resolution = geometry.resolution_of(shape)
        images = sample_images(
            final, prompts, seeds, steps, guidance, device=acc.device, resolution=resolution
        )
        store.write_bytes(job.samples_uri, png_bytes(image_grid(images, background=255)))
        summary.update(sample_steps=steps, sample_guidance=guidance, sample_prompts=prompts)
    acc.wait_for_everyone()
    return summary
