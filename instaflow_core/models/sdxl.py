"""The SDXL family: Stable Diffusion XL base (a UNet over 4-channel latents, two CLIP text encoders, size conditioning).

condition   embeds  (B, 77, D1 + D2): the penultimate hidden states of text_encoder (CLIP ViT-L, D1 = 768) and
                    text_encoder_2 (OpenCLIP bigG, D2 = 1280), each padded to its tokenizer's max length, concatenated
            pooled  (B, P): text_encoder_2's projected pooled output (P = 1280)
            extra["time_ids"] (B, 6), optional: the size and crop conditioning (original h, w, crop top, left,
                    target h, w). Without it the velocity uses diffusers' default for the latent it is given,
                    (H, W, 0, 0, H, W) with H, W the image size (latent size x 8): the same at every resolution
                    and in every stage, as StableDiffusionXLPipeline builds `add_time_ids`
            negative: zeros (embeds and pooled) for an empty negative prompt when model_index.json sets
                    `force_zeros_for_empty_prompt` (SDXL base does), as diffusers does with no negative prompt
velocity    v = unet(x_t, tau = (1 - t) * 1000, text, added_cond_kwargs={text_embeds: pooled, time_ids}): the
            SD family's mapping (`sd.unet_timestep`), the UNet's output is the velocity X1 - X0
latents     x8 VAE, scaling factor from vae/config.json (0.13025); the VAE overflows in float16, so with
            `force_upcast` it decodes (and encodes) in float32 when the model runs in float16, as diffusers does
teacher     the scheduler of generation.scheduler (the repo's EulerDiscreteScheduler, DPM-Solver++, DDIM) on the
            teacher's noise schedule, StableDiffusionXLPipeline's loop (guidance, guidance_rescale 0)
student     a StableDiffusionXLPipeline folder whose scheduler is `flow_scheduler.RectifiedFlowEulerScheduler`
            (x + v / N from tau = 1000): `DiffusionPipeline.from_pretrained` loads it (with this module imported)
            and runs the one-step model as `inference.generate.flow_images` does
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusionXLPipeline
from torch import Tensor, nn

from instaflow_core.errors import DataError
from instaflow_core.models.family import Condition, Model, ModelFamily, read_index, to_dtype
from instaflow_core.models.flow_scheduler import RectifiedFlowEulerScheduler
from instaflow_core.models.geometry import Geometry
from instaflow_core.models.sd import (
    CLIP_TOKENS,
    SCHEDULERS,
    autocast,
    make_scheduler,
    save_tokenizer_files,
    unet_timestep,
)

SDXL_VAE_FACTOR = 8  # every SDXL VAE: the image side is 8x the latent side (what the size conditioning reads)
FORCE_ZEROS = (
    "force_zeros_for_empty_prompt"  # model_index.json flag, kept as a part (a pipeline init argument)
)
ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def size_time_ids(batch: int, height: int, width: int, crop: tuple[int, int] = (0, 0)) -> Tensor:
    """(B, 6) float32 add_time_ids for images of height x width px: original size, crop top-left, target size
    (StableDiffusionXLPipeline's default: original = target = the generated size, no crop)."""
    row = torch.tensor([[height, width, *crop, height, width]], dtype=torch.float32)
    return row.expand(batch, 6)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@torch.no_grad()
def dual_clip_states(model: Model, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Prompts -> (embeds (B, 77, D1 + D2), pooled (B, P)): StableDiffusionXLPipeline.encode_prompt's tensors.

    Each encoder reads its own tokenizer's ids (padded to max length, truncated); the sequence embeddings are the
    penultimate hidden states, the pooled one is the first 2-d output (text_encoder_2's projection)."""
    states, pooled = [], None
    for enc_name, tok_name in ENCODERS:
        encoder, tokenizer = model[enc_name], model[tok_name]
        ids = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(_device(encoder))
        out = encoder(ids, output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]  # (B, P) text_embeds of the projection model
        states.append(out.hidden_states[-2])  # (B, 77, D_i)
    if pooled is None:
        raise DataError("text_encoder_2 gives no pooled projection (expected CLIPTextModelWithProjection)")
    last = model["text_encoder_2"]
    dtype, device = _dtype(last), _device(last)
    embeds = torch.cat([s.to(device=device, dtype=dtype) for s in states], dim=-1)  # (B, 77, D1 + D2)
    return embeds, pooled.to(device=device, dtype=dtype)


class SDXLFamily(ModelFamily):
    name: ClassVar[str] = "sdxl"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    denoiser: ClassVar[str] = "unet"
    required: ClassVar[tuple[str, ...]] = (
        "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
    )  # fmt: skip
    # the repo's own sampler first (the card: Euler / DPM-Solver++); the evaluation falls back to the first
    schedulers: ClassVar[tuple[str, ...]] = ("euler", *(s for s in SCHEDULERS if s != "euler"))
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    # ---- load -----------------------------------------------------------------------------------------
    def load(
        self,
        folder: Path,
        *,
        dtype: torch.dtype | str = "float32",
        allow_pickle: bool = False,
        skip: tuple[str, ...] = (),
    ) -> Model:
        model = super().load(folder, dtype=dtype, allow_pickle=allow_pickle, skip=skip)
        model.parts[FORCE_ZEROS] = bool(read_index(folder).get(FORCE_ZEROS, True))
        return model

    def from_configs(
        self, folder: Path, *, dtype: torch.dtype | str = "float32", skip: tuple[str, ...] = ()
    ) -> Model:
        model = super().from_configs(folder, dtype=dtype, skip=skip)
        model.parts[FORCE_ZEROS] = bool(read_index(folder).get(FORCE_ZEROS, True))
        return model

    def load_single_file(
        self, path: Path, *, config: str | None, local_files_only: bool, dtype: torch.dtype | str
    ) -> Model:
        """An original-format (SGM) SDXL checkpoint via diffusers' single-file loader."""
        try:
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=config, local_files_only=local_files_only, torch_dtype=to_dtype(dtype)
            )
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise DataError(
                f"{path.name}: not a loadable SDXL checkpoint: {str(err).splitlines()[0]}"
            ) from err
        parts: dict[str, Any] = {name: getattr(pipe, name) for name in self.required}
        parts[FORCE_ZEROS] = bool(pipe.config.get(FORCE_ZEROS, True))
        for part in parts.values():
            if isinstance(part, nn.Module):
                part.eval().requires_grad_(False)
        return Model(self, parts, None)

    # ---- conditions -----------------------------------------------------------------------------------
    def encode(self, model: Model, prompts: list[str]) -> Condition:
        embeds, pooled = dual_clip_states(model, prompts)
        return Condition(embeds=embeds, pooled=pooled)

    def negative(self, model: Model, prompts: list[str]) -> Condition:
        """The encoded negative prompts; rows whose prompt is empty are zeros when the model says
        `force_zeros_for_empty_prompt` (diffusers' unconditional input when no negative prompt is given)."""
        cond = self.encode(model, prompts)
        if not model.get(FORCE_ZEROS, True):
            return cond
        empty = torch.tensor([not p for p in prompts], device=cond.embeds.device)  # (B,)
        if not bool(empty.any()):
            return cond
        keep = (~empty).to(cond.embeds.dtype)
        return Condition(
            embeds=cond.embeds * keep[:, None, None], pooled=cond.pooled * keep[:, None], extra=cond.extra
        )

    # ---- velocity -------------------------------------------------------------------------------------
    def added_cond(self, x_t: Tensor, cond: Condition, dtype: torch.dtype) -> dict[str, Tensor]:
        """added_cond_kwargs of the UNet: the pooled text (B, P) and the size conditioning (B, 6)."""
        if cond.pooled is None:
            raise DataError("an SDXL condition needs pooled text embeddings (Condition.pooled)")
        b, device = x_t.shape[0], x_t.device
        time_ids = cond.extra.get("time_ids")
        if time_ids is None:
            time_ids = size_time_ids(b, x_t.shape[-2] * SDXL_VAE_FACTOR, x_t.shape[-1] * SDXL_VAE_FACTOR)
        return {
            "text_embeds": cond.pooled.to(device=device, dtype=dtype),
            "time_ids": time_ids.to(device=device, dtype=dtype),
        }

    def velocity(
        self,
        net: nn.Module,
        x_t: Tensor,
        t: Tensor,
        cond: Condition,
        controlnet: nn.Module | None = None,
        control_scale: float = 1.0,
    ) -> Tensor:
        tau = unet_timestep(t)  # (B,) float, 1000 = noise as in SD
        dtype = net.dtype
        x_in, text = x_t.to(dtype), cond.embeds.to(device=x_t.device, dtype=dtype)
        added = self.added_cond(x_t, cond, dtype)
        extra: dict[str, Any] = {}
        control = cond.extra.get("control")
        if controlnet is not None and control is not None:
            down, mid = controlnet(
                x_in,
                tau,
                encoder_hidden_states=text,
                controlnet_cond=control.to(device=x_t.device, dtype=dtype),
                conditioning_scale=control_scale,
                added_cond_kwargs=added,
                return_dict=False,
            )
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return net(x_in, tau, encoder_hidden_states=text, added_cond_kwargs=added, **extra).sample.to(
            x_t.dtype
        )

    def condition_shapes(self, configs: dict[str, dict[str, Any]]) -> dict[str, tuple[int, ...]]:
        """(77, D1 + D2) embeds and the pooled projection: the UNet's `text_time` input width less the 6 size ids'
        embeddings (2816 - 6 x 256 = 1280)."""
        unet = configs["unet"]
        pooled = int(unet["projection_class_embeddings_input_dim"]) - 6 * int(unet["addition_time_embed_dim"])
        return {"embeds": (CLIP_TOKENS, int(unet["cross_attention_dim"])), "pooled": (pooled,)}

    # ---- latents --------------------------------------------------------------------------------------
    def geometry(self, configs: dict[str, dict[str, Any]]) -> Geometry:
        if "unet" not in configs:
            raise DataError("no unet/config.json (not a diffusers SDXL folder)")
        geometry = Geometry.from_configs(configs["unet"], configs.get("vae"))
        if geometry.vae_factor != SDXL_VAE_FACTOR:
            raise DataError(
                f"an SDXL VAE down-samples by {SDXL_VAE_FACTOR} (its size conditioning reads it), this one by "
                f"{geometry.vae_factor}"
            )
        return geometry

    @staticmethod
    def _needs_upcast(vae: nn.Module) -> bool:
        return _dtype(vae) == torch.float16 and bool(getattr(vae.config, "force_upcast", False))

    def decode(self, model: Model, latents: Tensor) -> Tensor:
        """As the base, in float32 when the VAE is float16 and its config says `force_upcast` (the SDXL VAE
        overflows in float16: diffusers upcasts it for the decode and casts it back after)."""
        vae = model.vae
        if not self._needs_upcast(vae):
            return super().decode(model, latents)
        vae.to(torch.float32)
        try:
            return super().decode(model, latents)
        finally:
            vae.to(torch.float16)

    def encode_images(self, model: Model, images: Tensor) -> Tensor:
        vae = model.vae
        if not self._needs_upcast(vae):
            return super().encode_images(model, images)
        vae.to(torch.float32)
        try:
            return super().encode_images(model, images)
        finally:
            vae.to(torch.float16)

    # ---- the teacher ----------------------------------------------------------------------------------
    def teacher_sample(
        self,
        model: Model,
        x0: Tensor,
        cond: Condition,
        uncond: Condition | None,
        *,
        steps: int,
        guidance: float,
        scheduler: str,
        mixed_precision: str = "no",
        cfg_batched: bool = True,
    ) -> Tensor:
        """StableDiffusionXLPipeline's loop for a batch: a fresh scheduler of kind `scheduler` on the teacher's
        noise schedule, [uncond; cond] in one doubled forward (or two with `cfg_batched=False`), guidance
        v_u + w (v_c - v_u) on the UNet's output (guidance_rescale 0), the scheduler integrating in float32."""
        if isinstance(model.scheduler, RectifiedFlowEulerScheduler):
            raise DataError(
                "a rectified-flow SDXL model has no diffusion sampler: sample it with Euler steps"
            )
        unet = model.denoiser
        device, dtype = x0.device, unet.dtype
        sched = make_scheduler(scheduler, model.scheduler.config)
        sched.set_timesteps(steps, device=device)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
        do_cfg = guidance > 1.0
        if do_cfg and uncond is None:
            raise DataError("guidance > 1 needs the unconditional condition")
        cond = cond.to(device)
        both = Condition.cat([uncond.to(device), cond]) if do_cfg and cfg_batched else None  # type: ignore[union-attr]

        def eps_of(x_in: Tensor, t: Tensor, c: Condition) -> Tensor:
            added = self.added_cond(x_in, c, dtype)
            text = c.embeds.to(dtype)
            return unet(x_in.to(dtype), t, encoder_hidden_states=text, added_cond_kwargs=added).sample

        x = x0 * sched.init_noise_sigma
        for t in sched.timesteps:
            with autocast(device, mixed_precision):
                if both is not None:
                    eps = eps_of(sched.scale_model_input(torch.cat([x, x]), t), t, both)  # (2B, 4, h, w)
                else:  # no guidance, or uncond and cond as two forwards of (B, 4, h, w)
                    x_in = sched.scale_model_input(x, t)
                    eps = eps_of(x_in, t, cond)
                    if do_cfg:
                        eps = torch.cat([eps_of(x_in, t, uncond.to(device)), eps])  # type: ignore[union-attr]
            eps = eps.float()
            if do_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            x = sched.step(eps, t, x).prev_sample
        return x.float()

    # ---- folders --------------------------------------------------------------------------------------
    def save(self, model: Model, path: Path) -> Path:
        """A StableDiffusionXLPipeline folder (the teacher converted from a single file)."""
        pipe = StableDiffusionXLPipeline(
            vae=model.vae,
            text_encoder=model["text_encoder"],
            text_encoder_2=model["text_encoder_2"],
            tokenizer=model["tokenizer"],
            tokenizer_2=model["tokenizer_2"],
            unet=model.denoiser,
            scheduler=model.scheduler,
            force_zeros_for_empty_prompt=bool(model.get(FORCE_ZEROS, True)),
            add_watermarker=False,
        )
        pipe.save_pretrained(path, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            save_tokenizer_files(model[name], path / name)
        return path

    def save_student(
        self,
        base_folder: Path,
        net: nn.Module,
        out: Path,
        meta: dict[str, Any] | None = None,
        *,
        variants: bool = False,
        sample_size: int | None = None,
    ) -> Path:
        """The base's layout with `net` as the UNet and `RectifiedFlowEulerScheduler` as the scheduler, so that
        diffusers' own StableDiffusionXLPipeline samples the velocity UNet by Euler steps."""
        super().save_student(base_folder, net, out, meta, variants=variants, sample_size=sample_size)
        write_flow_scheduler(out)
        return out


def write_flow_scheduler(folder: Path) -> None:
    """Replace a folder's scheduler by `RectifiedFlowEulerScheduler` (its config and model_index.json entry)."""
    sched_dir = folder / "scheduler"
    if sched_dir.is_dir():
        for f in sched_dir.iterdir():
            f.unlink()
    RectifiedFlowEulerScheduler().save_pretrained(sched_dir)
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    cls = RectifiedFlowEulerScheduler
    index["scheduler"] = [cls.__module__, cls.__name__]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


FAMILY = SDXLFamily()
