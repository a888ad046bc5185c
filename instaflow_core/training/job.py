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

import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from instaflow_core.config import DistillationConfig, StorageConfig, TrainConfig, stable_hash
from instaflow_core.errors import DataError
from instaflow_core.inference.images import image_grid, png_bytes, sample_images
from instaflow_core.models.components import SDComponents
from instaflow_core.models.velocity import StudentVelocity
from instaflow_core.refs import TRAINED_KIND, ModelKind, ModelRef, Stage, TableRef
from instaflow_core.store import Store
from instaflow_core.training.losses import distill_batch_loss, reflow_batch_loss
from instaflow_core.training.student import PromptEmbeddings, load_student, save_stage_folder

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

    stage: Literal["reflow", "distill"]
    key: str  # hash of the inputs and the section: names the checkpoint and model folders
    section: dict[str, Any]
    storage: StorageConfig
    data: TableRef  # triplets (reflow) or distill_pairs (distill)
    base: ModelRef  # the model the student starts from and whose folder the result copies
    ckpt_dir: str
    out_uri: str
    samples_uri: str

    def train_cfg(self) -> TrainConfig:
        return (DistillationConfig if self.stage == "distill" else TrainConfig).model_validate(self.section)

    @property
    def out_kind(self) -> ModelKind:
        return TRAINED_KIND[Stage(self.stage)]

    def sample_settings(self) -> tuple[int, float]:
        """(steps, guidance) of the final sample grid: the one-step model is shown at 1 step, no guidance."""
        cfg = self.train_cfg()
        return (1, 1.0) if self.stage == "distill" else (cfg.sample_steps, cfg.sample_guidance)


def _local(store: Store, uri: str) -> Path:
    """A local path for a store URI or plain path (s3:// folders are downloaded once, cached)."""
    uri = store.resolve(uri)
    if uri.startswith(("s3://", "file://")):
        return store.local_copy(uri)
    return Path(uri).expanduser()


def folder_latent_shape(folder: str | Path) -> tuple[int, int, int]:
    """(C, h, w) of a diffusers folder's UNet latents, read from unet/config.json (no weights loaded)."""
    cfg_file = Path(folder) / "unet" / "config.json"
    if not cfg_file.is_file():
        raise DataError(f"{folder}: no unet/config.json (not a diffusers SD folder)")
    raw = json.loads(cfg_file.read_text())
    size = raw.get("sample_size", 64)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(raw.get("in_channels", 4)), int(h), int(w))


def check_job_inputs(job: TrainJob) -> tuple[int, int, int]:
    """Fail before any training when the table is empty or its latents do not fit the base model."""
    from instaflow_core.store.dataset import validate_triplets

    store = Store(job.storage)
    shape = folder_latent_shape(_local(store, job.base.uri))
    rows = validate_triplets(job.data, job.storage, shape)
    cfg = job.train_cfg()
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
    base_dir = _local(store, job.base.uri)
    init_dir = _local(store, cfg.init_from) if cfg.init_from else None
    comps = load_student(base_dir, init_dir)  # float32 master weights; bf16 is autocast (cfg.mixed_precision)
    comps.text_encoder.to(acc.device)
    comps.vae.to(acc.device)
    student = StudentVelocity.from_components(comps)
    embed = PromptEmbeddings(comps.text_encoder, comps.tokenizer)
    if job.stage == "reflow":
        loss_fn = reflow_batch_loss(embed, cfg.t_schedule, cfg.huber_c, cfg.seed)
    else:
        wants_lpips = any(st.loss == "lpips" for st in cfg.stages)
        lpips_net = build_lpips(cfg.lpips_weights).to(acc.device) if wants_lpips else None
        loss_fn = distill_batch_loss(
            embed,
            cfg.huber_c,
            decode=vae_decoder(comps.vae) if wants_lpips else None,
            lpips=lpips_distance(lpips_net) if lpips_net is not None else None,
        )
    result = train(
        student,
        triplet_batches(job.data, job.storage),
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
            folder = save_stage_folder(base_dir, ema_unet, Path(tmp) / "model", meta)
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
        images = sample_images(final, prompts, seeds, steps, guidance, device=acc.device)
        store.write_bytes(job.samples_uri, png_bytes(image_grid(images, background=255)))
        summary.update(sample_steps=steps, sample_guidance=guidance, sample_prompts=prompts)
    acc.wait_for_everyone()
    return summary
