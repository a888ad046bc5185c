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
- `sample_images` / `grid_png`: N-step generations for fixed prompts and seeds, tiled into one PNG.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file
from torch import Tensor, nn

from instaflow_core.config import DistillConfig, StorageConfig, TrainConfig, stable_hash
from instaflow_core.errors import DataError
from instaflow_core.models import SDComponents, UNetVelocity, encode_prompts, latent_shape, load_components
from instaflow_core.rectified_flow import distill_loss, reflow_loss, sample_t
from instaflow_core.refs import ModelRef, TableRef
from instaflow_core.store import Store

STAGE_META = "instaflow.json"  # next to model_index.json: what made this folder (the teacher has one too)
EVENT_PREFIX = "INSTAFLOW_EVENT "  # stdout lines of flows.train_entry that the launching task relays


# ------------------------------------------------------------------------------------------ the student
def load_student(
    base_folder: str | Path, init_from: str | Path | None = None, *, dtype: str = "float32"
) -> SDComponents:
    """The base model's components, the UNet replaced by `init_from` when given (a local path)."""
    comps = load_components(Path(base_folder), dtype=dtype)
    if init_from is not None:
        load_unet_weights(comps.unet, Path(init_from))
    return comps


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoints of `StudentVelocity` / `UNetVelocity` prefix UNet keys with `unet.`: drop it."""
    if state and all(k.startswith("unet.") for k in state):
        return {k[len("unet.") :]: v for k, v in state.items()}
    return {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")} or state


def load_unet_weights(unet: UNet2DConditionModel, source: Path) -> None:
    """Copy weights into `unet` from a diffusers folder, a UNet folder, a .safetensors file or a checkpoint."""
    if not source.exists():
        raise DataError(f"init_from {source}: not found")
    if source.is_dir() and (source / "unet").is_dir():
        source = source / "unet"
    if source.is_dir() and (source / "ema.safetensors").is_file():  # a training checkpoint: its EMA weights
        source = source / "ema.safetensors"
    if source.is_dir():
        files = sorted(source.glob("*.safetensors"))
        if not files:
            raise DataError(f"init_from {source}: no .safetensors weights in the folder")
        state: dict[str, Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
    elif source.suffix == ".safetensors":
        state = load_file(str(source))
    else:
        raise DataError(
            f"init_from {source}: expected a diffusers folder, a UNet folder or a .safetensors file"
        )
    state = _strip_prefix(state)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(
            f"init_from {source}: weights do not fit the base UNet ({str(err).splitlines()[0]})"
        ) from None


class StudentVelocity(nn.Module):
    """The trainable `v(x_t, t, cond)`: a UNet and `UNetVelocity.forward` (the one t -> tau mapping).

    Unlike `UNetVelocity` it holds no text encoder: embeddings come from `PromptEmbeddings` in the loss, so
    DDP, the EMA copy and the checkpoints carry the UNet alone, under `unet.` keys.
    """

    forward = UNetVelocity.forward

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet
        self.controlnet = None  # UNetVelocity.forward reads it

    @classmethod
    def from_components(cls, components: SDComponents) -> StudentVelocity:
        """The student over `components.unet` (trainable); VAE and text encoder frozen."""
        components.unet.requires_grad_(True).train()
        components.vae.requires_grad_(False).eval()
        components.text_encoder.requires_grad_(False).eval()
        return cls(components.unet)


# ------------------------------------------------------------------------------------------ text embeddings
class PromptEmbeddings:
    """Prompts -> (B, 77, D) from the frozen text encoder, with an LRU cache per prompt.

    A triplet table repeats each prompt `images_per_prompt` times and an epoch revisits all of them, so the
    cache saves most encoder calls; `max_entries` bounds it (77 x 768 floats = 236 KB per prompt for SD 1.5,
    so 1024 entries hold ~240 MB on the training device).
    """

    def __init__(self, text_encoder: nn.Module, tokenizer: Any, max_entries: int = 1024) -> None:
        self.text_encoder, self.tokenizer, self.max_entries = text_encoder, tokenizer, max_entries
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], device: torch.device | None = None) -> Tensor:
        device = device or self.text_encoder.device
        if self.text_encoder.device != device:
            self.text_encoder.to(device)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            emb = encode_prompts(self.text_encoder, self.tokenizer, missing)  # (M, 77, D)
            for p, e in zip(missing, emb, strict=True):
                self._cache[p] = e
        out = []
        for p in prompts:
            self._cache.move_to_end(p)
            out.append(self._cache[p])
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return torch.stack(out).to(device)  # (B, 77, D)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def reflow_batch_loss(
    embed: PromptEmbeddings, t_schedule: str = "uniform", huber_c: float = 0.001, seed: int = 0
) -> Callable[[nn.Module, dict], Tensor]:
    """loss_fn(model, batch) for reflow: E ||(X1 - X0) - v(X_t, t | text)|| with t from `t_schedule`.

    The times come from a CPU generator seeded per micro-batch from `seed` and the batch's triplet ids, so a
    resumed run draws the same t for the same batch as the uninterrupted run would.
    """

    def loss_fn(model: nn.Module, batch: dict) -> Tensor:
        x0, x1 = batch["x0"], batch["x1"]  # (B, 4, h, w)
        gen = torch.Generator().manual_seed(_batch_seed(seed, batch))
        t = sample_t(x0.shape[0], t_schedule, generator=gen, device=x0.device)  # (B,)
        cond = embed(batch["prompt"], x0.device)  # (B, 77, D)
        return reflow_loss(model, x0, x1, cond, t, kind=_loss_kind(batch), huber_c=huber_c)

    return loss_fn


def distill_batch_loss(
    embed: PromptEmbeddings,
    huber_c: float = 0.001,
    decode: Callable[[Tensor], Tensor] | None = None,
    lpips: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Callable[[nn.Module, dict], Tensor]:
    """loss_fn(model, batch) for one-step distillation: X0 + v(X0, 0) against the 2-RF output X1."""

    def loss_fn(model: nn.Module, batch: dict) -> Tensor:
        x0, x1 = batch["x0"], batch["x1"]
        cond = embed(batch["prompt"], x0.device)
        kind = _loss_kind(batch)
        return distill_loss(model, x0, x1, cond, kind=kind, huber_c=huber_c, decode=decode, lpips=lpips)

    return loss_fn


def _loss_kind(batch: dict) -> str:
    """The loop puts the current TrainStageConfig in `batch["stage"]`; its `.loss` picks the distance."""
    stage = batch.get("stage")
    return stage.loss if stage is not None else "l2"


def _batch_seed(seed: int, batch: dict) -> int:
    ids = batch.get("triplet_id")
    key = "|".join(map(str, ids)) if ids is not None else str(batch["x0"].flatten()[:4].tolist())
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------ saving
def save_stage_folder(
    base_folder: str | Path, unet: UNet2DConditionModel, out: str | Path, meta: dict[str, Any] | None = None
) -> Path:
    """Write `out` = the base diffusers folder with `unet` in place of its UNet (safetensors), plus a meta file.

    Everything but `unet/` is copied from the base (VAE, text encoder, tokenizer, scheduler, model_index.json),
    so the folder loads wherever the base loaded, including `InstaFlowPipeline.from_pretrained`.
    """
    base, out = Path(base_folder), Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("unet", STAGE_META))
    unet.save_pretrained(out / "unet", safe_serialization=True)
    if meta:
        (out / STAGE_META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    return out


# ------------------------------------------------------------------------------------------ sample grids
@torch.no_grad()
def sample_images(
    components: SDComponents,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float = 1.0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """N-step Euler generations through `InstaFlowPipeline`, uint8 (B, H, W, 3); X0 from `noise_from_seeds`."""
    from instaflow_core.pipeline import InstaFlowPipeline
    from instaflow_core.teacher import noise_from_seeds

    pipe = InstaFlowPipeline.from_components(components).to(device)
    pipe.set_progress_bar_config(disable=True)
    x0 = noise_from_seeds(list(seeds), latent_shape(components))  # (B, 4, h, w), CPU generators
    images = pipe(
        list(prompts), num_inference_steps=steps, guidance_scale=guidance, latents=x0, output_type="np"
    ).images  # (B, H, W, 3) float in [0, 1]
    return (np.asarray(images) * 255).round().astype(np.uint8)


def grid_png(images: np.ndarray, cols: int | None = None) -> bytes:
    """Tile uint8 images (B, H, W, 3) row-major into one PNG (bytes)."""
    from PIL import Image

    b, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    canvas = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ a stage's job
class TrainJob(BaseModel):
    """Everything one training stage needs, as JSON: what the Prefect task runs in process, or hands to
    `accelerate launch -m flows.train_entry <job.json>` on every process when training is distributed.

    `section` is the stage's config section (TrainConfig for reflow, DistillConfig for distill) as a dict.
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
        return (DistillConfig if self.stage == "distill" else TrainConfig).model_validate(self.section)

    @property
    def out_kind(self) -> str:
        return "instaflow" if self.stage == "distill" else "2rf"

    def sample_settings(self) -> tuple[int, float]:
        """(steps, guidance) of the final sample grid: the one-step model is shown at 1 step, no guidance."""
        cfg = self.train_cfg()
        return (1, 1.0) if self.stage == "distill" else (cfg.sample_steps, cfg.sample_guidance)


def _local(store: Store, uri: str) -> Path:
    """A local path for a store URI or plain path (s3:// folders are downloaded once, cached)."""
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
    from instaflow_core.losses_lpips import build_lpips, lpips_distance, vae_decoder
    from instaflow_core.training import make_accelerator, train

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
        store.write_bytes(job.samples_uri, grid_png(images))
        summary.update(sample_steps=steps, sample_guidance=guidance, sample_prompts=prompts)
    acc.wait_for_everyone()
    return summary
