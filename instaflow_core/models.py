"""Models: load the teacher/student SD components, build the tiny ones, and the velocity adapter around a UNet.

Everything on disk is a diffusers folder with safetensors (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/), the layout the released InstaFlow / 2-RF folders use too. `UNetVelocity` is the one
place that turns the project's time `t` in [0, 1] (t=0 noise) into the SD UNet's timestep and prompts into text
embeddings; everything else (training, sampling) sees a plain `v(x_t, t, cond)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

from instaflow_core.config import ModelsConfig, TinyModelConfig
from instaflow_core.errors import ConfigError, DataError
from instaflow_core.rectified_flow import unet_timestep
from instaflow_core.tokenizer_assets import tiny_tokenizer

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
COMPONENT_NAMES = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SDComponents:
    """The five parts of an SD-architecture model. `save` writes a standard diffusers SD folder."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: SchedulerMixin

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
    ) -> SDComponents:
        """Move (and optionally cast) the three networks in place; returns self."""
        kwargs: dict[str, Any] = {}
        if device is not None:
            kwargs["device"] = device
        if dtype is not None:
            kwargs["dtype"] = to_dtype(dtype)
        if kwargs:
            for module in (self.unet, self.vae, self.text_encoder):
                module.to(**kwargs)
        return self

    def save(self, path: str | Path) -> Path:
        """Write a diffusers folder (model_index.json says StableDiffusionPipeline, safety checker null)."""
        path = Path(path)
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(path, safe_serialization=True)
        # transformers 5 writes only tokenizer.json; older readers (and the released folders) use vocab + merges.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend.model, "save"):
            backend.model.save(str(path / "tokenizer"))
        return path

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def to_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"models.dtype={dtype!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# ------------------------------------------------------------------------------------------- the tiny model
def build_tiny(tiny_cfg: TinyModelConfig | None = None) -> SDComponents:
    """SD-architecture UNet / VAE / CLIP text encoder, random init from `tiny_cfg.seed` (same weights every call)."""
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
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.text_hidden_size,
                intermediate_size=cfg.text_intermediate_size,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads,
                max_position_embeddings=77,
                projection_dim=cfg.cross_attention_dim,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DPMSolverMultistepScheduler(**SD15_SCHEDULER, algorithm_type="dpmsolver++")
    for module in (unet, vae, text_encoder):
        module.eval()
    return SDComponents(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


# ---------------------------------------------------------------------------------------------- loading
def load_components(
    source: str | Path,
    *,
    allow_pickle: bool = False,
    local_files_only: bool = True,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    config: str | None = None,
) -> SDComponents:
    """Load SD components from a local diffusers folder, a single .safetensors checkpoint, or a hub id.

    Pickle checkpoints (.ckpt/.bin/.pt) execute code when loaded: refused unless `allow_pickle`. A hub id is
    looked up in the local cache only, unless `local_files_only=False`. `config` (single files only) is a local
    diffusers folder or hub id whose component configs describe the checkpoint (default: inferred by diffusers).
    """
    torch_dtype = to_dtype(dtype)
    src = str(source)
    if src.startswith("file://"):
        src = src[len("file://") :]
    elif "://" in src:
        raise DataError(
            f"model source {src!r}: copy remote folders locally first (Store.local_copy), then load"
        )
    path = Path(src).expanduser()
    if path.is_dir():
        return _load_folder(path, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
    if path.suffix in (".safetensors", *PICKLE_SUFFIXES):
        if not path.is_file():
            raise DataError(f"model checkpoint not found: {path}")
        if path.suffix != ".safetensors" and not allow_pickle:
            raise DataError(
                f"{path.name}: pickle checkpoints can run arbitrary code when loaded; convert it to "
                ".safetensors or set models.allow_pickle=true if you trust it"
            )
        return _load_single_file(
            path, local_files_only=local_files_only, torch_dtype=torch_dtype, config=config
        )
    if path.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise DataError(
            f"model source {src!r} is neither a diffusers folder, a .safetensors file nor a hub id (owner/name)"
        )
    return _load_hub(
        src,
        allow_pickle=allow_pickle,
        local_files_only=local_files_only,
        revision=revision,
        torch_dtype=torch_dtype,
    )


def _load_folder(path: Path, *, allow_pickle: bool, torch_dtype: torch.dtype) -> SDComponents:
    """Load each component from its subfolder (works whatever pipeline class model_index.json names)."""
    missing = [name for name in COMPONENT_NAMES if not (path / name).is_dir()]
    if missing:
        raise DataError(f"{path}: not a diffusers SD folder (missing {', '.join(missing)}/)")
    # use_safetensors=True makes loading fail instead of silently unpickling a .bin
    safe = None if allow_pickle else True
    try:
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", torch_dtype=torch_dtype, use_safetensors=safe
        )
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", torch_dtype=torch_dtype, use_safetensors=safe
        )
        text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=torch_dtype, use_safetensors=safe
        )
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = load_scheduler(path / "scheduler")
    except (OSError, ValueError) as err:
        hint = (
            "" if allow_pickle else " (only .safetensors weights are loaded unless models.allow_pickle=true)"
        )
        raise DataError(f"{path}: cannot load the model: {str(err).splitlines()[0]}{hint}") from None
    for module in (unet, vae, text_encoder):
        module.eval()
    return SDComponents(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


def load_scheduler(folder: str | Path) -> SchedulerMixin:
    """Instantiate the scheduler class that scheduler_config.json names."""
    import diffusers

    cfg_file = Path(folder) / "scheduler_config.json"
    if not cfg_file.is_file():
        raise DataError(f"{cfg_file} not found")
    name = json.loads(cfg_file.read_text()).get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not issubclass(cls, SchedulerMixin):
        raise DataError(f"{cfg_file}: unknown scheduler class {name!r}")
    return cls.from_pretrained(folder)


def _load_single_file(
    path: Path, *, local_files_only: bool, torch_dtype: torch.dtype, config: str | None
) -> SDComponents:
    """An original-format (LDM/A1111) SD checkpoint via diffusers' single-file loader."""
    if config is None and local_files_only:
        # diffusers would silently download the inferred config repo when it is not cached: look it up ourselves.
        config = _cached_single_file_config(path)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=config,
            local_files_only=local_files_only,
            torch_dtype=torch_dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise DataError(f"{path.name}: not a loadable SD checkpoint: {str(err).splitlines()[0]}") from None
    return SDComponents(
        unet=pipe.unet.eval(),
        vae=pipe.vae.eval(),
        text_encoder=pipe.text_encoder.eval(),
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
    )


def _cached_single_file_config(path: Path) -> str:
    """The local snapshot of the diffusers config repo a single-file checkpoint needs, or a clear error."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint
    from huggingface_hub import snapshot_download

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise DataError(f"{path.name}: unreadable checkpoint ({str(err).splitlines()[0]})") from None
    repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    try:
        return snapshot_download(
            repo, local_files_only=True, allow_patterns=["*.json", "*/*.json", "*/*.txt"]
        )
    except Exception:
        raise DataError(
            f"{path.name} needs the component configs of {repo!r}, which are not cached: download them "
            f"(huggingface-cli download {repo} --include '*.json' '*.txt') or set models.local_files_only=false"
        ) from None


def _load_hub(
    repo: str, *, allow_pickle: bool, local_files_only: bool, revision: str | None, torch_dtype: torch.dtype
) -> SDComponents:
    """A hub repo, taken from the local cache (or downloaded when local_files_only=False), then loaded as a folder."""
    from huggingface_hub import snapshot_download

    # Only the five component folders: SD repos also hold multi-GB root checkpoints and fp16/flax/onnx copies.
    weights = ["*.safetensors"] + (["*.bin"] if allow_pickle else [])
    patterns = ["model_index.json"] + [f"{c}/*.{ext}" for c in COMPONENT_NAMES for ext in ("json", "txt")]
    patterns += [f"{c}/{w}" for c in ("unet", "vae", "text_encoder") for w in weights]
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            local_files_only=local_files_only,
            allow_patterns=patterns,
            ignore_patterns=["*.fp16.*", "*non_ema*", "*.ema.*"],
        )
    except Exception as err:
        if local_files_only:
            raise DataError(
                f"model {repo!r} is not in the local Hugging Face cache: download it (huggingface-cli download "
                f"{repo}) or set models.local_files_only=false"
            ) from None
        raise DataError(f"cannot download model {repo!r}: {str(err).splitlines()[0]}") from None
    return _load_folder(Path(folder), allow_pickle=allow_pickle, torch_dtype=torch_dtype)


def teacher_components(models_cfg: ModelsConfig) -> SDComponents:
    """The teacher named by the config: `tiny` builds it, anything else is a source for `load_components`."""
    if models_cfg.teacher == "tiny":
        comps = build_tiny(models_cfg.tiny)
        if models_cfg.dtype != "float32":
            comps.to(dtype=models_cfg.dtype)
        return comps
    return load_components(
        models_cfg.teacher,
        allow_pickle=models_cfg.allow_pickle,
        local_files_only=models_cfg.local_files_only,
        revision=models_cfg.teacher_revision,
        dtype=models_cfg.dtype,
    )


def latent_shape(components: SDComponents) -> tuple[int, int, int]:
    """(C, h, w) of the UNet's latent: (4, 64, 64) for SD 1.5, (4, 8, 8) for the tiny preset."""
    size = components.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(components.unet.config.in_channels), int(h), int(w))


# ------------------------------------------------------------------------------------------ the adapter
@torch.no_grad()
def encode_prompts(
    text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str] | str
) -> torch.Tensor:
    """Prompts -> (B, 77, D) last hidden states, padded to max length: exactly what SD pipelines feed the UNet."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


class UNetVelocity(nn.Module):
    """`v(x_t, t, cond)` over an SD UNet: the UNet output is the velocity X1 - X0 (rectified-flow models).

    The only place that maps `t` (0 = noise) to the UNet timestep `(1 - t) * 1000` and prompts to embeddings.
    The text encoder is frozen; `trainable_parameters()` is the UNet's. An optional ControlNet adds its residuals
    to the UNet call at the same timestep.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerBase,
        controlnet: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.controlnet = controlnet

    @classmethod
    def from_components(cls, components: SDComponents) -> UNetVelocity:
        return cls(components.unet, components.text_encoder, components.tokenizer)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts -> text embeddings (B, 77, D), padded to the tokenizer's max length, no grad."""
        return encode_prompts(self.text_encoder, self.tokenizer, prompts)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float,
        cond: torch.Tensor,
        control_image: torch.Tensor | None = None,
        control_scale: float = 1.0,
    ) -> torch.Tensor:
        """x_t (B,4,h,w), t (B,) or scalar in [0,1], cond (B,77,D) -> velocity (B,4,h,w)."""
        if not torch.is_tensor(t):
            t = torch.tensor(float(t))
        t = t.to(device=x_t.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        tau = unet_timestep(t)  # (B,) float, 1000 = noise as in SD
        dtype = self.unet.dtype
        x_in, cond = x_t.to(dtype), cond.to(dtype)
        extra: dict[str, Any] = {}
        if self.controlnet is not None and control_image is not None:
            down, mid = self.controlnet(
                x_in,
                tau,
                encoder_hidden_states=cond,
                controlnet_cond=control_image.to(device=x_t.device, dtype=dtype),
                conditioning_scale=control_scale,
                return_dict=False,
            )
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(x_in, tau, encoder_hidden_states=cond, **extra).sample.to(x_t.dtype)
