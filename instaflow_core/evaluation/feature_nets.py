"""Feature networks for FID / Frechet distance and CLIP score, and an honest label for each.

Every network reports `label` and `paper_comparable`: the results carry them, so a number computed with a
stand-in (a random tiny CLIP, or CLIP/DINOv2 features in place of Inception) is never mistaken for the paper's.

- `inception`: the standard FID Inception-v3 (pt_inception-2015-12-05) through torch-fidelity; the weights file's
  sha256 is checked against torch-fidelity's published hash first. On machines where torch-fidelity cannot be
  imported (it needs torchvision) this fails with a clear message instead of silently switching networks.
- `clip` / `dinov2` / a local folder or hub id: `transformers` models (no torchvision needed). Frechet distance
  on these features is a well-defined metric (e.g. FD_DINOv2) but not FID.
- `tiny`: a small random CLIPModel built from a CLIPConfig with a fixed seed, using the tiny tokenizer: it
  proves the plumbing on a CPU and nothing about image quality.

Images come in as uint8 arrays (B, H, W, 3) (or float32 in [0, 255], already at `input_size`, from a protocol's
resize pipeline, protocols.ProtocolFeatures); preprocessing (resize, centre crop, normalise) is done in torch so
that no torchvision-backed image processor is needed. Hub repos are fetched as `model.safetensors` + configs only
(HUB_ALLOW / HUB_IGNORE: never a repo's open_clip copy or pickled weights).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from instaflow_core.config import EvaluationConfig, ModelsConfig, TinyModelConfig
from instaflow_core.errors import ConfigError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DINOV2 = "facebook/dinov2-large"  # ViT-L/14, the FD_DINOv2 backbone of Stein et al. 2023
TINY_CLIP_IMAGE_SIZE = 32
TINY_CLIP_SEED = 1234
STAND_IN = "stand-in, not paper-comparable"
# what a transformers model folder needs from the hub: weights as safetensors and the configs/tokenizer files;
# never open_clip's copy (open_clip_model.safetensors, 5.5 GB for ViT-g/14) nor pickled *.bin weights
HUB_ALLOW = [
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "*.json",
    "*.txt",
]
HUB_IGNORE = ["open_clip_*", "*.bin", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx", "*.ckpt"]
# torch-fidelity's published hash of weights-inception-2015-12-05-6726825d.pth (the same file as pytorch-fid's
# pt_inception-2015-12-05-6726825d.pth): the first 8 hex digits of its sha256, torch.hub's check_hash convention
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_FILE = (
    "weights-inception-2015-12-05-6726825d.pth"  # where torch-fidelity downloads it (torch hub dir)
)
# CLIP vision towers by (hidden size, patch size, layers): which CLIP ran, read from the loaded model's config
CLIP_ARCHS = {
    (768, 32, 12): "ViT-B/32",
    (768, 16, 12): "ViT-B/16",
    (1024, 14, 24): "ViT-L/14",
    (1280, 14, 32): "ViT-H/14",
    (1408, 14, 40): "ViT-g/14",
    (1664, 14, 48): "ViT-bigG/14",
}


class FeatureNet(Protocol):
    """Anything that maps images to feature vectors."""

    name: str
    label: str
    paper_comparable: bool

    def image_features(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> float64 (B, D)."""
        ...


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_pixels(
    images: np.ndarray,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | None = None,
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, size, size): shorter side to `size` (bicubic), centre crop."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images shaped (B, H, W, 3), got {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device or "cpu").permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (projection in pooler_output); 4.x a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


# ------------------------------------------------------------------------------------------------- CLIP
@dataclass
class ClipNet:
    """A transformers CLIPModel: image and text embeddings (projected), for CLIP score and CLIP-feature FD."""

    model: Any  # transformers.CLIPModel
    tokenizer: Any
    name: str
    label: str
    paper_comparable: bool
    image_size: int
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    batch_size: int = 32
    arch: str = ""  # ViT-g/14, ViT-B/32, ... (clip_arch of the loaded config); "tiny" for the stand-in

    @property
    def input_size(self) -> int:
        """The pixel size the vision tower takes (a protocol's second resize targets it)."""
        return self.image_size

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> float64 (B, D) projected image embeddings (not normalised)."""
        dev = next(self.model.parameters()).device
        out = []
        for i in range(0, len(images), self.batch_size):
            px = to_pixels(images[i : i + self.batch_size], self.image_size, self.mean, self.std, dev)
            px = px.to(next(self.model.parameters()).dtype)
            out.append(_pooled(self.model.get_image_features(pixel_values=px)).double().cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> np.ndarray:
        """prompts -> float64 (B, D) projected text embeddings (not normalised); truncated to 77 tokens."""
        dev = next(self.model.parameters()).device
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(
                list(prompts[i : i + self.batch_size]),
                padding="max_length",
                truncation=True,
                max_length=min(77, self.tokenizer.model_max_length),
                return_tensors="pt",
            )
            feats = self.model.get_text_features(
                input_ids=tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev)
            )
            out.append(_pooled(feats).double().cpu())
        return torch.cat(out).numpy()


def tiny_clip(tiny_cfg: TinyModelConfig | None = None, seed: int = TINY_CLIP_SEED) -> ClipNet:
    """A small random CLIPModel (fixed seed, tiny tokenizer): same weights every call, no download."""
    from transformers import CLIPConfig, CLIPModel

    from instaflow_core.models.tokenizer import tiny_tokenizer

    cfg = tiny_cfg or TinyModelConfig()
    tokenizer = tiny_tokenizer(cfg.vocab_merges)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_CLIP_IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's RNG stream
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    return ClipNet(
        model=model,
        tokenizer=tokenizer,
        name="tiny",
        label=f"tiny-random CLIP (seed {seed}; {STAND_IN})",
        paper_comparable=False,
        image_size=TINY_CLIP_IMAGE_SIZE,
        arch="tiny",
    )


def clip_arch(vision_config: Any) -> str:
    """ViT-g/14 etc. from a CLIP vision config (hidden size, patch size, layers), else ViT-<hidden>/<patch>."""
    key = (
        int(vision_config.hidden_size),
        int(vision_config.patch_size),
        int(vision_config.num_hidden_layers),
    )
    return CLIP_ARCHS.get(key, f"ViT-{key[0]}/{key[1]} ({key[2]} layers)")


def _hf_folder(source: str, local_files_only: bool, what: str) -> Path:
    """A local folder, or a hub id resolved from the local cache (downloaded only when local_files_only=False)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ConfigError(f"{what}={source!r}: no such folder (give a local transformers folder or a hub id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source,
                local_files_only=local_files_only,
                allow_patterns=HUB_ALLOW,
                ignore_patterns=HUB_IGNORE,
            )
        )
    except Exception as err:
        if local_files_only:
            raise ConfigError(
                f"{what}={source!r} is not in the local Hugging Face cache: download it "
                f"(huggingface-cli download {source} --include {' '.join(repr(p) for p in HUB_ALLOW)} "
                f"--exclude {' '.join(repr(p) for p in HUB_IGNORE)}), give a local folder, or set "
                "models.local_files_only=false"
            ) from err
        raise ConfigError(f"{what}={source!r}: cannot download it") from err


def _preprocess_cfg(folder: Path, default_size: int, mean: tuple, std: tuple) -> tuple[int, tuple, tuple]:
    """Crop size and normalisation from preprocessor_config.json when the folder has one."""
    f = folder / "preprocessor_config.json"
    if not f.is_file():
        return default_size, mean, std
    pc = json.loads(f.read_text())
    crop = pc.get("crop_size", default_size)
    size = crop.get("height", default_size) if isinstance(crop, dict) else int(crop)
    return int(size), tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))


def load_clip(source: str, *, local_files_only: bool = True, what: str = "evaluation.clip_model") -> ClipNet:
    """A CLIPModel + tokenizer from a local folder or hub id (cache only unless local_files_only=False)."""
    from transformers import AutoTokenizer, CLIPModel

    folder = _hf_folder(source, local_files_only, what)
    try:
        model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval().to(_device())
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what}={source!r}: cannot load a CLIP model: {str(err).splitlines()[0]}") from err
    size, mean, std = _preprocess_cfg(
        folder, model.config.vision_config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    )
    return ClipNet(
        model=model,
        tokenizer=tokenizer,
        name=f"clip:{source}",
        label=f"CLIP {source} (real weights)",
        paper_comparable=True,
        image_size=size,
        mean=mean,
        std=std,
        arch=clip_arch(model.config.vision_config),
    )


# ----------------------------------------------------------------------------------------------- DINOv2
@dataclass
class DinoNet:
    """DINOv2 CLS-token features (FD_DINOv2, Stein et al. 2023): real weights, but not FID."""

    model: Any
    name: str
    label: str
    image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    paper_comparable: bool = False  # the paper reports Inception FID; FD_DINOv2 is a different number
    batch_size: int = 32

    @property
    def input_size(self) -> int:
        return self.image_size

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> np.ndarray:
        dev = next(self.model.parameters()).device
        out = []
        for i in range(0, len(images), self.batch_size):
            px = to_pixels(images[i : i + self.batch_size], self.image_size, self.mean, self.std, dev)
            hidden = self.model(pixel_values=px.to(next(self.model.parameters()).dtype)).last_hidden_state
            out.append(hidden[:, 0].double().cpu())  # CLS token (B, D)
        return torch.cat(out).numpy()


def load_dinov2(source: str, *, local_files_only: bool = True) -> DinoNet:
    from transformers import AutoModel

    folder = _hf_folder(source, local_files_only, "evaluation.fid_features")
    try:
        model = AutoModel.from_pretrained(folder, use_safetensors=True).eval().to(_device())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"evaluation.fid_features={source!r}: cannot load DINOv2: {str(err).splitlines()[0]}"
        ) from err
    size, mean, std = _preprocess_cfg(folder, 224, IMAGENET_MEAN, IMAGENET_STD)
    return DinoNet(
        model=model,
        name=f"dinov2:{source}",
        label=f"DINOv2 {source} (real weights; Frechet distance on DINOv2 features, not Inception FID)",
        image_size=size,
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------------------- Inception
@dataclass
class InceptionNet:
    """The standard FID Inception-v3 (2048-d pool features) through torch-fidelity: paper-comparable FID."""

    model: Any
    name: str = "inception-v3-compat"
    label: str = "Inception-v3 pt_inception-2015-12-05 via torch-fidelity (paper-comparable FID)"
    paper_comparable: bool = True
    batch_size: int = 32
    weights_id: str | None = None  # protocols.INCEPTION_WEIGHTS once the weights file's hash was checked
    input_size: int = 299
    resizes_like: str = "legacy-tf"  # torch-fidelity resizes to 299 itself, with TF 1.x bilinear
    uint8_input: bool = True  # torch-fidelity takes uint8 only

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> np.ndarray:
        dev = next(self.model.parameters()).device
        out = []
        for i in range(0, len(images), self.batch_size):
            # torch-fidelity takes uint8 (B, 3, H, W) and resizes to 299 itself, as the TF reference did
            batch = np.asarray(images[i : i + self.batch_size])
            if batch.dtype != np.uint8:  # float pixels of a protocol's resize: round as torch-fidelity needs
                batch = np.rint(batch).clip(0, 255).astype(np.uint8)
            x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
            (feats,) = self.model(x.to(dev))
            out.append(feats.double().cpu())
        return torch.cat(out).numpy()


INCEPTION_HELP = (
    "evaluation.fid_features=inception needs torch-fidelity (pip install torch-fidelity; it requires a working "
    "torchvision) and evaluation.inception_weights=<local path to pt_inception-2015-12-05-6726825d.pth>; on machines "
    "without torchvision use evaluation.fid_features=dinov2 or clip (Frechet distance, labelled as not FID)"
)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_inception_weights(path: str | Path, what: str = "evaluation.inception_weights") -> None:
    """ConfigError (one line) unless the file's sha256 starts with torch-fidelity's published hash."""
    digest = file_sha256(Path(path).expanduser())
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        raise ConfigError(
            f"{what}={str(path)!r} is not the FID Inception weights pt_inception-2015-12-05: its sha256 starts "
            f"{digest[:8]}, torch-fidelity publishes {INCEPTION_SHA256_PREFIX} (a wrong or damaged file)"
        )


def load_inception(weights: str | None, *, local_files_only: bool = True) -> InceptionNet:
    """torch-fidelity's FID Inception with the weights file checked against the published hash (before the
    import, so a wrong file is reported on any machine)."""
    from instaflow_core.evaluation.protocols import INCEPTION_WEIGHTS

    if weights is None and local_files_only:
        raise ConfigError(
            "evaluation.inception_weights is not set: give the local path of pt_inception-2015-12-05-6726825d.pth "
            "(or set models.local_files_only=false to let torch-fidelity download it)"
        )
    if weights is not None:
        if not Path(weights).expanduser().is_file():
            raise ConfigError(f"evaluation.inception_weights={weights!r}: file not found")
        check_inception_weights(weights)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as err:  # ImportError, or torchvision's own RuntimeError when its build is broken
        raise ConfigError(f"{INCEPTION_HELP} (import failed: {str(err).splitlines()[0]})") from err
    model = FeatureExtractorInceptionV3(
        name="inception-v3-compat",
        features_list=["2048"],
        feature_extractor_weights_path=str(Path(weights).expanduser()) if weights else None,
    )
    if weights is None:  # downloaded by torch-fidelity into the torch hub folder: check that file
        downloaded = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if not downloaded.is_file():
            raise ConfigError(
                f"torch-fidelity's Inception weights are not at {downloaded}: give evaluation.inception_weights"
            )
        check_inception_weights(downloaded, "the downloaded Inception weights")
    return InceptionNet(model=model.eval().to(_device()), weights_id=INCEPTION_WEIGHTS)


# ----------------------------------------------------------------------------------------------- choosing
def clip_network(eval_cfg: EvaluationConfig, models_cfg: ModelsConfig) -> ClipNet:
    """The CLIP model of the CLIP score: `tiny` or a local folder / hub id (`evaluation.clip_model`)."""
    if eval_cfg.clip_model == "tiny":
        return tiny_clip(models_cfg.tiny)
    return load_clip(eval_cfg.clip_model, local_files_only=models_cfg.local_files_only)


def _model_type(folder: Path) -> str:
    f = folder / "config.json"
    return json.loads(f.read_text()).get("model_type", "") if f.is_file() else ""


def fid_network(
    eval_cfg: EvaluationConfig, models_cfg: ModelsConfig, clip: ClipNet | None = None
) -> FeatureNet:
    """The feature network of the Frechet distance named by `evaluation.fid_features`.

    inception | clip (the CLIP-score model) | dinov2 (facebook/dinov2-large) | tiny | a local folder / hub id
    of a CLIP or DINOv2 model. `clip` reuses an already loaded ClipNet when given.
    """
    choice = eval_cfg.fid_features
    lfo = models_cfg.local_files_only
    if choice == "inception":
        return load_inception(eval_cfg.inception_weights, local_files_only=lfo)
    if choice == "tiny":
        return clip if clip is not None and clip.name == "tiny" else tiny_clip(models_cfg.tiny)
    if choice == "clip":
        net = clip or clip_network(eval_cfg, models_cfg)
        if net.name == "tiny":
            return net
        return ClipNet(
            **{**net.__dict__, "paper_comparable": False, "label": net.label + "; FD on CLIP, not FID"}
        )
    if choice == "dinov2":
        return load_dinov2(DEFAULT_DINOV2, local_files_only=lfo)
    # a path or hub id: decide by the model type in its config
    folder = _hf_folder(choice, lfo, "evaluation.fid_features")
    kind = _model_type(folder)
    if kind == "dinov2":
        return load_dinov2(str(folder), local_files_only=True)
    if kind == "clip":
        net = load_clip(str(folder), local_files_only=True, what="evaluation.fid_features")
        return ClipNet(
            **{**net.__dict__, "paper_comparable": False, "label": net.label + "; FD on CLIP, not FID"}
        )
    raise ConfigError(
        f"evaluation.fid_features={choice!r}: config.json says model_type={kind!r}; expected a CLIP or DINOv2 model "
        "(or one of inception, clip, dinov2, tiny)"
    )


def describe_networks(fid_net: FeatureNet, clip_net: ClipNet) -> dict[str, Any]:
    """What ran, for the results: labels say 'stand-in' whenever a number is not paper-comparable."""
    return {
        "fid_features": fid_net.label,
        "fid_paper_comparable": bool(fid_net.paper_comparable),
        "clip_model": clip_net.label,
        "clip_paper_comparable": bool(clip_net.paper_comparable),
        # what the numbers are called in tables, when the network names its own metric (digits metrics);
        # otherwise evaluation/names.metric_headers names them (FID only when paper-comparable)
        **({"fid_metric": fid_net.metric} if getattr(fid_net, "metric", None) else {}),
        **({"clip_metric": clip_net.metric} if getattr(clip_net, "metric", None) else {}),
    }
