"""The SD family: Stable Diffusion 1.x and 2.x (a UNet over 4-channel latents, one CLIP text encoder).

condition   CLIP's last hidden states (B, 77, D), padded to the tokenizer's max length (SD 2.x's text
            encoder config stops one layer early: its "last" is OpenCLIP's penultimate, as the real repo)
velocity    v = unet(x_t, tau = (1 - t) * 1000, text): the UNet's output is the velocity X1 - X0 (what
            reflow trains it into; the released InstaFlow / 2-RF folders use the same mapping)
latents     x8 VAE, scaling factor from vae/config.json (0.18215 for SD 1.x, also when the config lacks it)
teacher     the scheduler of generation.scheduler (DPM-Solver++, Euler, DDIM) built on the teacher's own
            noise schedule, so epsilon (SD 1.x) and v-prediction (SD 2.x) teachers are both solved as
            diffusers' StableDiffusionPipeline solves them, with classifier-free guidance
student     a StableDiffusionPipeline folder (safety checker null): `InstaFlowPipeline` and diffusers'
            `DiffusionPipeline.from_pretrained` both load it
tiny        `build_tiny(models.tiny)`: an SD-architecture model small enough for a CPU, random init from a
            seed, over the bundled tiny CLIP tokenizer (the tests' and the tiny preset's teacher)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from instaflow_core.errors import ConfigError, DataError
from instaflow_core.models.family import Condition, Model, ModelFamily, to_dtype
from instaflow_core.models.geometry import Geometry
from instaflow_core.models.tokenizer import tiny_tokenizer

# SD 1.x noise schedule (scheduler_config.json of stable-diffusion-v1-5): the tiny teacher uses the same one.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
)
SD15_SCALING_FACTOR = 0.18215
CLIP_TOKENS = 77  # the CLIP tokenizers' model_max_length: every condition is padded to it
UNET_TIMESTEPS = 1000.0  # tau = (1 - t) * 1000: "1000 = noise", as SD's UNet was trained
SCHEDULERS = ("dpmsolver++", "euler", "ddim")


def unet_timestep(t: Tensor | float) -> Tensor:
    """Our t in [0, 1] (0 = noise) -> the SD UNet timestep (1 - t) * 1000 as a float (1000 = noise)."""
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.float()
    return (1.0 - t) * UNET_TIMESTEPS


@torch.no_grad()
def clip_hidden_states(text_encoder: nn.Module, tokenizer: Any, prompts: list[str]) -> Tensor:
    """Prompts -> (B, 77, D) last hidden states, padded to max length: exactly what SD pipelines feed the UNet."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler of kind `name` (dpmsolver++ | euler | ddim) on the teacher's noise schedule (its
    prediction type included: SD 2.x's v-prediction carries over from the base config)."""
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=2
        )
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base_config)
    if name == "ddim":
        # clip_sample clips x0 to [-1, 1], meant for pixels, wrong for SD latents (StableDiffusionPipeline turns
        # it off too); set_alpha_to_one=False is SD's setting.
        return DDIMScheduler.from_config(
            base_config, clip_sample=False, set_alpha_to_one=dict(base_config).get("set_alpha_to_one", False)
        )
    raise ConfigError(f"generation.scheduler={name!r}: choose one of {list(SCHEDULERS)}")


def autocast(device: torch.device | str, mixed_precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for 'fp16' / 'bf16', a no-op for 'no'."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if mixed_precision not in dtypes:
        raise ConfigError(f"mixed_precision={mixed_precision!r}: choose no, fp16 or bf16")
    return torch.autocast(device_type=torch.device(device).type, dtype=dtypes[mixed_precision])


class SDFamily(ModelFamily):
    name: ClassVar[str] = "sd"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)
    denoiser: ClassVar[str] = "unet"
    required: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    schedulers: ClassVar[tuple[str, ...]] = SCHEDULERS
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    def claims(self, index: dict[str, Any]) -> bool:
        unet = index.get("unet") or [None, None]
        return index.get("_class_name") in self.pipeline_classes and unet[1] in (None, "UNet2DConditionModel")

    # ---- conditions -----------------------------------------------------------------------------------
    def encode(self, model: Model, prompts: list[str]) -> Condition:
        return Condition(embeds=clip_hidden_states(model["text_encoder"], model["tokenizer"], prompts))

    def condition_shapes(self, configs: dict[str, dict[str, Any]]) -> dict[str, tuple[int, ...]]:
        """CLIP's hidden states over 77 tokens at the UNet's cross-attention width (768 SD 1.x, 1024 SD 2.x)."""
        return {"embeds": (CLIP_TOKENS, int(configs["unet"]["cross_attention_dim"]))}

    # ---- velocity -------------------------------------------------------------------------------------
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
        x_in, text = x_t.to(dtype), cond.embeds.to(dtype)
        extra: dict[str, Any] = {}
        control = cond.extra.get("control")
        if controlnet is not None and control is not None:
            down, mid = controlnet(
                x_in,
                tau,
                encoder_hidden_states=text,
                controlnet_cond=control.to(device=x_t.device, dtype=dtype),
                conditioning_scale=control_scale,
                return_dict=False,
            )
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return net(x_in, tau, encoder_hidden_states=text, **extra).sample.to(x_t.dtype)

    # ---- latents --------------------------------------------------------------------------------------
    def geometry(self, configs: dict[str, dict[str, Any]]) -> Geometry:
        if "unet" not in configs:
            raise DataError("no unet/config.json (not a diffusers SD folder)")
        return Geometry.from_configs(configs["unet"], configs.get("vae"))

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
        """StableDiffusionPipeline's loop written out for a batch: a fresh scheduler (multistep schedulers keep
        state), uncond and cond in one doubled forward (or two with `cfg_batched=False`, half the activation
        memory), the scheduler integrating in float32."""
        unet = model.denoiser
        device = x0.device
        sched = make_scheduler(scheduler, model.scheduler.config)
        sched.set_timesteps(steps, device=device)
        do_cfg = guidance > 1.0
        text = cond.embeds
        if do_cfg:
            assert uncond is not None, "guidance > 1 needs the unconditional condition"
            neg = uncond.embeds
            if cfg_batched:
                text = torch.cat([neg, text])  # (2B, 77, D): uncond first, as diffusers
            neg = neg.to(unet.dtype)
        text = text.to(unet.dtype)
        x = x0 * sched.init_noise_sigma
        for t in sched.timesteps:
            with autocast(device, mixed_precision):
                if do_cfg and cfg_batched:
                    x_in = sched.scale_model_input(torch.cat([x, x]), t)  # (2B, 4, h, w)
                    eps = unet(x_in.to(unet.dtype), t, encoder_hidden_states=text).sample
                else:  # no guidance, or uncond and cond as two forwards of (B, 4, h, w)
                    x_in = sched.scale_model_input(x, t).to(unet.dtype)
                    eps = unet(x_in, t, encoder_hidden_states=text).sample
                    if do_cfg:
                        eps = torch.cat([unet(x_in, t, encoder_hidden_states=neg).sample, eps])
            eps = eps.float()
            if do_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            x = sched.step(eps, t, x).prev_sample  # the scheduler integrates in float32
        return x.float()

    # ---- folders --------------------------------------------------------------------------------------
    def load_single_file(
        self, path: Path, *, config: str | None, local_files_only: bool, dtype: torch.dtype | str
    ) -> Model:
        """An original-format (LDM/A1111) SD checkpoint via diffusers' single-file loader."""
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=config,
                local_files_only=local_files_only,
                torch_dtype=to_dtype(dtype),
                safety_checker=None,
                feature_extractor=None,  # a config folder without feature_extractor/ is fine: it is never used
                requires_safety_checker=False,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise DataError(f"{path.name}: not a loadable SD checkpoint: {str(err).splitlines()[0]}") from err
        parts = {name: getattr(pipe, name) for name in self.required}
        for name in ("unet", "vae", "text_encoder"):
            parts[name].eval().requires_grad_(False)
        return Model(self, parts, None)

    def build(self, cfg: Any) -> Model:
        """The tiny SD-architecture model of `models.tiny` (`build_tiny`)."""
        return build_tiny(cfg)

    def save(self, model: Model, path: Path) -> Path:
        """A StableDiffusionPipeline folder (model_index.json with the safety checker null)."""
        pipe = StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=model["text_encoder"],
            tokenizer=model["tokenizer"],
            unet=model.denoiser,
            scheduler=model.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(path, safe_serialization=True)
        save_tokenizer_files(model["tokenizer"], path / "tokenizer")
        return path


def save_tokenizer_files(tokenizer: Any, folder: Path) -> None:
    """transformers 5 writes only tokenizer.json; older readers (and the released folders) use vocab + merges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend.model, "save"):
        backend.model.save(str(folder))


FAMILY = SDFamily()


# ------------------------------------------------------------------------------------------- tiny models
def clip_text_encoder(
    tokenizer: Any, *, hidden: int, layers: int, heads: int, intermediate: int, projection: int
) -> nn.Module:
    """A CLIP text encoder of the given width over `tokenizer` (random init from the current RNG state)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            projection_dim=projection,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_tiny(tiny_cfg: Any = None) -> Model:
    """SD-architecture UNet / VAE / CLIP text encoder, random init from `tiny_cfg.seed` (same weights every call).

    `tiny_cfg` is `config.TinyModelConfig` (models.tiny)."""
    from instaflow_core.config import (
        TinyModelConfig,  # the vocabulary; imported here to keep this module light
    )

    cfg = tiny_cfg or TinyModelConfig()
    n_unet = len(cfg.unet_channels)
    n_vae = len(cfg.vae_channels)
    if n_unet < 1 or n_vae < 1:
        raise ConfigError("models.tiny.unet_channels and models.tiny.vae_channels need at least one entry")
    if cfg.text_hidden_size != cfg.cross_attention_dim:
        raise ConfigError(
            f"models.tiny.text_hidden_size ({cfg.text_hidden_size}) must equal cross_attention_dim "
            f"({cfg.cross_attention_dim}): the UNet attends to the text encoder's hidden states"
        )
    tokenizer = tiny_tokenizer(cfg.vocab_merges)
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        # SD 1.x layout: cross-attention in every block but the deepest down block (and its mirror up block).
        unet = UNet2DConditionModel(
            sample_size=cfg.sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=tuple(cfg.unet_channels),
            layers_per_block=cfg.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
            cross_attention_dim=cfg.cross_attention_dim,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=min(32, min(cfg.unet_channels)),
        )
        torch.manual_seed(cfg.seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=tuple(cfg.vae_channels),
            down_block_types=("DownEncoderBlock2D",) * n_vae,
            up_block_types=("UpDecoderBlock2D",) * n_vae,
            layers_per_block=1,
            norm_num_groups=min(32, min(cfg.vae_channels)),
            sample_size=cfg.sample_size * 2 ** (n_vae - 1),
            scaling_factor=SD15_SCALING_FACTOR,
        )
        torch.manual_seed(cfg.seed + 2)
        text_encoder = clip_text_encoder(
            tokenizer,
            hidden=cfg.text_hidden_size,
            layers=cfg.text_layers,
            heads=cfg.text_heads,
            intermediate=cfg.text_intermediate_size,
            projection=cfg.cross_attention_dim,
        )
    scheduler = DPMSolverMultistepScheduler(**SD15_SCHEDULER, algorithm_type="dpmsolver++")
    for module in (unet, vae, text_encoder):
        module.eval()
    parts = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
    return Model(FAMILY, parts, None)


def sd15_scheduler(kind: str = "euler") -> SchedulerMixin:
    """A scheduler on SD 1.x's noise schedule (folders of models built from config keep one)."""
    if kind == "euler":
        return EulerDiscreteScheduler(**SD15_SCHEDULER)
    return DPMSolverMultistepScheduler(**SD15_SCHEDULER, algorithm_type="dpmsolver++")
