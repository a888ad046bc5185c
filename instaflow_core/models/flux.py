"""The FLUX family: FLUX.1-dev and FLUX.1-schnell (an MMDiT over 16-channel latents packed 2x2 into tokens).

condition   embeds (B, L, 4096): T5-XXL's last hidden states, padded to L = 512 tokens for a guidance-distilled
            transformer (FLUX.1-dev) and 256 for one without the guidance embedding (FLUX.1-schnell), as the model
            cards call FluxPipeline (`max_sequence_length`). pooled (B, 768): CLIP-L's pooled output (77 tokens).
            No mask (FluxPipeline passes none). extra["guidance"] (B,): the embedded guidance value (dev only;
            `with_guidance`), absent = DEFAULT_GUIDANCE.
velocity    our latents stay unpacked (B, 16, h, w) everywhere (the store, noise from seeds, training); here, and
            only here, they are packed 2x2 into (B, h/2 * w/2, 64) tokens with their position ids (row, column;
            the text's ids are zeros) and the transformer's output is unpacked. The transformer runs on
            timestep = sigma = 1 - t (FluxPipeline passes the scheduler's t / 1000; the model multiplies by 1000)
            and predicts noise - image, the derivative of x = (1 - sigma) image + sigma noise along sigma; ours is
            image - noise along t: v = -transformer(pack(x_t), 1 - t, text, pooled, guidance).
guidance    FLUX.1-dev is guidance-distilled: no classifier-free guidance, the guidance value is an input. A
            guidance setting g > 1 goes into extra["guidance"] (`with_guidance`, cfg weight 1, so a student keeps the
            input); g <= 1 (the project's "no guidance", what one-step models are sampled with) leaves the
            condition's own value, DEFAULT_GUIDANCE (3.5, FluxPipeline's default) when it has none. Students are
            trained on conditions without the value, i.e. with the input at DEFAULT_GUIDANCE whatever guidance
            their pairs were made with (3.5 in the flux-dev preset), so a FLUX.1-dev student reproduces at
            guidance 3.5 (`FluxPipeline(..., guidance_scale=3.5)`). FLUX.1-schnell has no guidance embedding:
            the value is never used, and a guidance setting above 1 is a preflight error (`setting_problems`).
latents     x8 VAE, latent = (vae latent - shift_factor) * scaling_factor (0.3611, 0.1159): what FluxPipeline's
            output_type="latent" returns (packed); resolutions are multiples of 16 px (VAE 8 x packing 2)
teacher     "flow-euler": the repo's FlowMatchEulerDiscreteScheduler on FluxPipeline's explicit grid
            sigmas = linspace(1, 1/N, N), shifted by mu = calculate_shift(image tokens) when the config shifts
            dynamically (dev; schnell's does not), exactly FluxPipeline's loop; "euler": shift 1 on our uniform grid
            sigma_i = 1 - i/N, the teacher's own flow by Euler (its 1-RF)
student     a FluxPipeline folder (the scheduler kept): with one step the grid is [1, 0] whatever the shift, so
            `DiffusionPipeline.from_pretrained(student)(..., num_inference_steps=1)` (guidance_scale 3.5 for dev) is
            our one step X0 + v(X0, 0)
single file a Black Forest Labs checkpoint (`flux1-dev.safetensors`: the transformer only, as the real files)
            with the VAE, text encoders, tokenizers and scheduler of the repo it belongs to (dev or schnell by its
            guidance embedding; from the local cache unless models.local_files_only=false)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SchedulerMixin
from torch import Tensor, nn

from instaflow_core.errors import ConfigError, DataError
from instaflow_core.models.family import (
    Condition,
    Guidance,
    Model,
    ModelFamily,
    read_index,
    replace,
    to_dtype,
)
from instaflow_core.models.geometry import Geometry
from instaflow_core.models.sd import autocast, save_tokenizer_files

PACK = 2  # latents are packed 2x2 into one token (C * 4 features)
TIMESTEPS = 1000.0  # the scheduler's timesteps are sigma * 1000; the transformer takes sigma
CLIP_TOKENS = 77
T5_TOKENS_DEV = 512  # FluxPipeline's max_sequence_length, FLUX.1-dev's model card
T5_TOKENS_SCHNELL = 256  # FLUX.1-schnell's model card
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default, FLUX.1-dev's card
NATIVE_RESOLUTION = 1024  # FluxPipeline's default_sample_size 128 x the VAE's 8
SCHEDULERS = ("flow-euler", "euler")  # the first is the teacher's own (evaluation's default for the teacher)
# the guidance settings of a run (teacher and students): a transformer without the guidance embedding takes none
GUIDANCE_SETTINGS = (
    ("generation.guidance_scale", lambda c: c.generation.guidance_scale),
    ("distillation.pairs.guidance_scale", lambda c: c.distillation.pairs.guidance_scale),
    ("reflow.sample_guidance", lambda c: c.reflow.sample_guidance),
    ("evaluation.teacher_guidance", lambda c: c.evaluation.teacher_guidance),
    ("evaluation.rf_guidance", lambda c: c.evaluation.rf_guidance),
)


# ------------------------------------------------------------------------------------------- packing
def pack(x: Tensor) -> Tensor:
    """Latents (B, C, h, w) -> tokens (B, h/2 * w/2, 4C), each token a 2x2 patch (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PACK, PACK, w // PACK, PACK)  # (B, C, h/2, 2, w/2, 2)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Tokens (B, h/2 * w/2, 4C) -> latents (B, C, h, w) (FluxPipeline._unpack_latents, in latent sizes)."""
    b, _, d = tokens.shape
    c = d // (PACK * PACK)
    x = tokens.reshape(b, h // PACK, w // PACK, c, PACK, PACK)  # (B, h/2, w/2, C, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """Position ids (h/2 * w/2, 3) of the packed tokens of (h, w) latents: (0, row, column) per token, row-major
    as `pack` orders them (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // PACK, w // PACK, 3)
    ids[..., 1] += torch.arange(h // PACK)[:, None]
    ids[..., 2] += torch.arange(w // PACK)[None, :]
    return ids.reshape(-1, 3).to(device)


# ------------------------------------------------------------------------------------------ conditions
def has_guidance_embedding(net: nn.Module) -> bool:
    """Whether the transformer takes a guidance value (FLUX.1-dev) or not (FLUX.1-schnell)."""
    return bool(getattr(net.config, "guidance_embeds", False))


def t5_tokens(model: Model) -> int:
    """T5 tokens the model's conditions hold: 512 for a guidance-distilled transformer (dev), else 256 (schnell),
    never more than the T5 tokenizer's own limit."""
    n = T5_TOKENS_DEV if has_guidance_embedding(model.denoiser) else T5_TOKENS_SCHNELL
    limit = getattr(model["tokenizer_2"], "model_max_length", None)
    return min(n, int(limit)) if isinstance(limit, int) and limit > 0 else n


@torch.no_grad()
def clip_pooled(text_encoder: nn.Module, tokenizer: Any, prompts: list[str]) -> Tensor:
    """Prompts -> CLIP's pooled output (B, D) over 77 tokens padded to max length (FluxPipeline's)."""
    max_len = min(int(getattr(tokenizer, "model_max_length", CLIP_TOKENS) or CLIP_TOKENS), CLIP_TOKENS)
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids, output_hidden_states=False).pooler_output


@torch.no_grad()
def t5_states(text_encoder: nn.Module, tokenizer: Any, prompts: list[str], max_length: int) -> Tensor:
    """Prompts -> T5's last hidden states (B, max_length, D), padded to max_length (FluxPipeline's tokenisation)."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids, output_hidden_states=False)[0]


# ------------------------------------------------------------------------------------------ the sampler
def make_scheduler(name: str, base_config: Any, steps: int) -> tuple[SchedulerMixin, dict[str, Any]]:
    """(a fresh scheduler, the keywords of its `set_timesteps` but `mu`) for generation.scheduler `name`:

    flow-euler  the repo's FlowMatchEulerDiscreteScheduler on FluxPipeline's explicit sigmas linspace(1, 1/N, N)
                (the scheduler's own grid when its config says use_flow_sigmas, as the pipeline)
    euler       the same class at shift 1 on the uniform grid sigma_i = 1 - i/N: our Euler steps
    """
    if name == "flow-euler":
        sched = FlowMatchEulerDiscreteScheduler.from_config(base_config)
        if sched.config.get("use_flow_sigmas", False):
            return sched, {"num_inference_steps": steps}
        return sched, {"sigmas": np.linspace(1.0, 1 / steps, steps)}
    if name == "euler":
        sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(dict(base_config).get("num_train_timesteps", 1000)), shift=1.0
        )
        return sched, {"sigmas": [1.0 - i / steps for i in range(steps)]}
    raise ConfigError(
        f"generation.scheduler={name!r}: the flux teacher's sampler takes one of {list(SCHEDULERS)}"
    )


def image_shift(config: Any, tokens: int) -> float:
    """FluxPipeline's mu for `tokens` image tokens (calculate_shift with the scheduler config's bounds)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = dict(config)
    return float(
        calculate_shift(
            tokens,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
    )


def single_file_repo(path: Path) -> str:
    """The hub repo an original FLUX.1 checkpoint belongs to, from its keys (no tensor read): FLUX.1-dev when it
    holds the guidance embedding, FLUX.1-schnell otherwise; a DataError for other FLUX models (Fill, Depth, ...:
    image tokens of other widths, pipelines this family does not claim)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            width = f.get_slice("img_in.weight").get_shape()[1] if "img_in.weight" in keys else None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise DataError(f"{path.name}: unreadable checkpoint ({str(err).splitlines()[0]})") from err
    if width is None:
        raise DataError(f"{path.name}: no img_in.weight (not an original-format FLUX.1 checkpoint)")
    if width != 4 * 16:
        raise DataError(
            f"{path.name}: a FLUX model with {width} input features per token (Fill / Depth / Canny take the "
            "control image in the tokens): only FLUX.1-dev / -schnell-shaped text-to-image models are supported"
        )
    return (
        "black-forest-labs/FLUX.1-dev"
        if "guidance_in.in_layer.weight" in keys
        else "black-forest-labs/FLUX.1-schnell"
    )


class FluxFamily(ModelFamily):
    name: ClassVar[str] = "flux"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    denoiser: ClassVar[str] = "transformer"
    required: ClassVar[tuple[str, ...]] = (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    )
    # FLUX.1-dev's; a FLUX.1-schnell transformer (no guidance embedding) has none: `guidance_kind(configs)`
    guidance: ClassVar[Guidance] = "embedded"
    schedulers: ClassVar[tuple[str, ...]] = SCHEDULERS
    # the joint attention's image and text projections (what diffusers' FLUX LoRA scripts train)
    lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )  # fmt: skip

    def claims(self, index: dict[str, Any]) -> bool:
        transformer = index.get("transformer") or [None, None]
        return index.get("_class_name") in self.pipeline_classes and transformer[1] in (
            None,
            "FluxTransformer2DModel",
        )

    @staticmethod
    def guidance_kind(configs: dict[str, dict[str, Any]]) -> Guidance:
        """ "embedded" for a transformer with the guidance embedding (FLUX.1-dev), "none" without (schnell)."""
        return "embedded" if (configs.get("transformer") or {}).get("guidance_embeds", False) else "none"

    def setting_problems(self, cfg: Any) -> list[str]:
        """The base rules (the sampler names) and, for a teacher without the guidance embedding (FLUX.1-schnell),
        every guidance setting above 1: it has no guidance, neither embedded nor classifier-free."""
        out = super().setting_problems(cfg)
        from instaflow_core.errors import InstaflowError
        from instaflow_core.models.sources import model_configs

        try:
            _, configs = model_configs(cfg.models.teacher, cfg.storage, cfg.models)
        except InstaflowError:  # unreadable configs are the teacher check's to report
            return out
        if self.guidance_kind(configs) == "none":
            out += [
                f"{name}={value}: the flux teacher has no guidance embedding (FLUX.1-schnell): set it to 1"
                for name, get in GUIDANCE_SETTINGS
                if (value := get(cfg)) > 1
            ]
        return out

    # ---- conditions -----------------------------------------------------------------------------------
    def encode(self, model: Model, prompts: list[str]) -> Condition:
        te = model["text_encoder_2"]
        embeds = t5_states(te, model["tokenizer_2"], prompts, t5_tokens(model))  # (B, 512 | 256, 4096)
        pooled = clip_pooled(model["text_encoder"], model["tokenizer"], prompts)  # (B, 768)
        return Condition(embeds=embeds, pooled=pooled.to(device=embeds.device))

    def with_guidance(self, cond: Condition, guidance: float) -> tuple[Condition, float]:
        """The guidance value embedded (g > 1) into the condition, classifier-free weight 1 (see the module doc)."""
        if guidance > 1.0:
            g = torch.full((len(cond),), float(guidance), device=cond.embeds.device)  # (B,)
            cond = replace(cond, extra={"guidance": g})
        return cond, 1.0

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
        if controlnet is not None:
            raise DataError("ControlNets of the flux family are not supported")
        return -self.predict(net, x_t, 1.0 - t, cond)  # v = image - noise = -(noise - image)

    def predict(self, net: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        """The transformer's own prediction noise - image (B, C, h, w) in x's dtype at sigma (B,) (1 = noise)."""
        if cond.pooled is None:
            raise DataError("a flux condition needs pooled text embeddings (CLIP's pooled output)")
        b, _, h, w = x.shape
        if h % PACK or w % PACK:
            raise DataError(f"flux latents of {h}x{w}: the 2x2 packing needs even sides")
        dtype = net.dtype
        guidance = None
        if has_guidance_embedding(net):
            g = cond.extra.get("guidance")
            g = torch.full((b,), DEFAULT_GUIDANCE) if g is None else g.reshape(-1).expand(b)
            guidance = g.to(device=x.device, dtype=torch.float32)  # (B,), as FluxPipeline passes it
        out = net(
            hidden_states=pack(x.to(dtype)),  # (B, h/2 * w/2, 4C)
            timestep=sigma.to(device=x.device, dtype=dtype),  # (B,) the model scales by 1000 itself
            guidance=guidance,
            pooled_projections=cond.pooled.to(dtype),  # (B, 768)
            encoder_hidden_states=cond.embeds.to(dtype),  # (B, L, 4096)
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x.device),  # (L, 3)
            img_ids=image_ids(h, w, x.device),  # (h/2 * w/2, 3)
            return_dict=False,
        )[0]  # (B, h/2 * w/2, 4C)
        return unpack(out, h, w).to(x.dtype)

    def condition_shapes(self, configs: dict[str, dict[str, Any]]) -> dict[str, tuple[int, ...]]:
        """T5 states (512 tokens with the guidance embedding, 256 without, 4096 wide) and CLIP-L's pooled output
        (768); the guidance value rides in `extra` only when sampling with guidance."""
        tr = configs["transformer"]
        tokens = T5_TOKENS_DEV if tr.get("guidance_embeds") else T5_TOKENS_SCHNELL
        return {
            "embeds": (tokens, int(tr["joint_attention_dim"])),
            "pooled": (int(tr["pooled_projection_dim"]),),
        }

    # ---- latents --------------------------------------------------------------------------------------
    def geometry(self, configs: dict[str, dict[str, Any]]) -> Geometry:
        tr = configs.get("transformer")
        if not tr:
            raise DataError("no transformer/config.json (not a diffusers FLUX folder)")
        vae = configs.get("vae") or {}
        vae_factor = 2 ** (len(vae.get("block_out_channels") or [0] * 4) - 1)
        size = vae.get("sample_size") or NATIVE_RESOLUTION  # the image side the VAE was made for (1024)
        side = (size if isinstance(size, int) else int(size[0])) // vae_factor
        patch = int(tr.get("patch_size", 1))
        return Geometry(
            in_channels=int(tr.get("in_channels", 64)) // (PACK * PACK),  # 64 token features = 16 x 2 x 2
            sample_size=(side, side),
            vae_factor=vae_factor,
            unet_factor=PACK * patch,
            factor_name="2x2 token packing",
        )

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
        """FluxPipeline's loop for a batch: a fresh scheduler on its grid (mu from the image token count), the
        guidance value embedded (dev) and no classifier-free pass (`uncond` unused), the scheduler integrating in
        float32 on our unpacked latents (the step is elementwise: the same numbers as on the pipeline's tokens).
        The pipeline's noise is our X0 packed (its first sigma is 1) and its output latents are ours packed."""
        net = model.denoiser
        device = x0.device
        b, _, h, w = x0.shape
        if not has_guidance_embedding(net) and guidance > 1.0:
            raise ConfigError(
                f"guidance {guidance:g}: the flux teacher has no guidance embedding (FLUX.1-schnell): set it to 1"
            )
        sched, grid = make_scheduler(scheduler, model.scheduler.config, steps)
        if (
            scheduler == "flow-euler"
        ):  # FluxPipeline passes mu always; a scheduler without dynamic shifting ignores it
            grid["mu"] = image_shift(sched.config, (h // PACK) * (w // PACK))
        sched.set_timesteps(device=device, **grid)
        sched.set_begin_index(0)
        cond, _ = self.with_guidance(cond, guidance)
        x = x0.float()
        for t in sched.timesteps:
            sigma = t.expand(b).to(torch.float32) / TIMESTEPS  # (B,) the pipeline's timestep / 1000
            with autocast(device, mixed_precision):
                pred = self.predict(net, x, sigma, cond)  # noise - image (B, 16, h, w)
            x = sched.step(pred.float(), t, x, return_dict=False)[0]  # x + (sigma_next - sigma) * pred
        return x.float()

    # ---- folders --------------------------------------------------------------------------------------
    def load_single_file(
        self, path: Path, *, config: str | None, local_files_only: bool, dtype: torch.dtype | str
    ) -> Model:
        """An original-format (Black Forest Labs) FLUX.1 transformer checkpoint (`flux1-dev.safetensors`: the
        transformer only, as the real files) via diffusers' single-file loader; the VAE, text encoders, tokenizers
        and scheduler from the repo `config` names (a local folder or hub id; default: FLUX.1-dev or -schnell by
        the file's guidance embedding), whose weights must be there (cached, unless `local_files_only=False`)."""
        from diffusers import FluxTransformer2DModel

        from instaflow_core.models.sources import hub_snapshot, missing_files

        repo = config or single_file_repo(path)
        local = Path(repo).expanduser()
        folder = local if local.is_dir() else hub_snapshot(repo, local_files_only=local_files_only)
        missing = [m for m in missing_files(folder) if not m.startswith(f"{self.denoiser}/")]
        if missing:
            raise DataError(
                f"{path.name} holds the FLUX transformer only: the VAE and text encoders come from {repo}, which "
                f"lacks {', '.join(missing)} (download the whole repo)"
            )
        try:
            net = FluxTransformer2DModel.from_single_file(
                str(path), config=str(folder), subfolder=self.denoiser, local_files_only=True,
                torch_dtype=to_dtype(dtype),
            )  # fmt: skip
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise DataError(
                f"{path.name}: not a loadable FLUX checkpoint: {str(err).splitlines()[0]}"
            ) from err
        index = read_index(folder)
        parts: dict[str, Any] = {self.denoiser: net}
        for name in self.required:
            if name != self.denoiser:
                parts[name] = self.load_component(folder, name, index, to_dtype(dtype), False)
        for part in parts.values():
            if isinstance(part, nn.Module):
                part.eval().requires_grad_(False)
        return Model(self, parts, None)

    def save(self, model: Model, path: Path) -> Path:
        """A FluxPipeline folder (image_encoder / feature_extractor null)."""
        self.pipeline(model).save_pretrained(path, safe_serialization=True)
        save_tokenizer_files(model["tokenizer"], path / "tokenizer")
        return path


FAMILY = FluxFamily()
