"""Evaluation protocols: what a protocol is, how it resizes images for the feature network, and when a result
earns the "paper-comparable" label.

A protocol names the captions, the sample count, the image size, the resize pipeline, the CLIP model and the CLIP
caption prefix of an evaluation. Every result records the protocol it ran (results JSON and table, the MLflow
evaluation run, the registered model version's tags).

- `coco2017-5k`: InstaFlow's FID-5k. 5,000 captions of MS COCO 2017 val (one per image), images at their native
  resolution (centre crop only, then straight to the network's input size); reference = the same 5,000 images.
- `coco2014-30k`: the FID-30k the paper cites (GigaGAN's evaluation code): 30,000 captions of COCO 2014 val,
  real and generated images centre-cropped and LANCZOS-resized to 256, clean-fid's resize to 299; reference =
  ALL 40,504 val2014 images; CLIP text prefixed "A photo depicts " (as GigaGAN's CLIP score code does).
- `teacher` (named `teacher-<N>`): no COCO needed. The student's images against the teacher's own images on the
  SAME prompts and seeds (teacher at evaluation.teacher_steps / teacher_guidance), the practice of DMD2 and
  SenseFlow: a distance to the teacher, not to real photos. The default when no COCO images are configured.
- `teacher-other-seeds` (`teacher-other-seeds-<N>`): the earlier no-COCO reference, the teacher's images for the
  same prompts from other seeds.
- `holdout-images` (`holdout-images-<N>`): prompts curated from an image table (digits): the held-out real images.

Resize pipelines (the pixels the network sees; centre crop to a square first):
- `legacy-tf`: torch-fidelity's path: PIL bicubic to `image_size` (uint8), then TensorFlow-1.x bilinear to the
  network's input (no half-pixel centres, computed in float). The FID Inception does that second step itself.
- `clean`: clean-fid's path (GigaGAN's code): PIL LANCZOS to `image_size` (uint8), then PIL bicubic per channel in
  float to the network's input, clipped to [0, 255]. torch-fidelity's Inception takes uint8 only, so there the
  float pixels are rounded (at most 0.5/255 from clean-fid's unrounded input).
`image_size` None (native) skips the first resize.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from instaflow_core.errors import ConfigError

ResizeName = Literal["legacy-tf", "clean"]
RESIZES: tuple[str, ...] = ("legacy-tf", "clean")
FROM_PROTOCOL = "protocol"  # a config knob left to the protocol's value

PAPER_CLIP = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"  # open_clip ViT-g-14, pretrained=laion2b_s12b_b42k
PAPER_CLIP_ARCH = "ViT-g/14"
INCEPTION_WEIGHTS = (
    "pt_inception-2015-12-05"  # the FID Inception (TF 2015-12-05 graph, torch-fidelity's port)
)
GIGAGAN_CLIP_PREFIX = "A photo depicts "

COCO2017_5K = "coco2017-5k"
COCO2014_30K = "coco2014-30k"
TEACHER = "teacher"
TEACHER_OTHER_SEEDS = "teacher-other-seeds"
HOLDOUT_IMAGES = "holdout-images"
AUTO = "auto"


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol. `paper_*` values are what a result must match to be labelled paper-comparable
    (None: not published, any value is accepted and recorded); the others are the defaults of the config knobs."""

    key: str
    data: str  # the captions / prompts
    reference: str  # the reference image set
    image_size: int | None  # default size of the first resize (None = native)
    resize: str  # default resize pipeline
    caption_prefix: str = ""  # default prefix of the CLIP-score text
    paper: bool = False  # one of the paper's protocols (can be paper-comparable)
    paper_samples: int | None = None
    paper_reference_images: int | None = None
    paper_resize: str | None = None
    paper_caption_prefix: str | None = None
    paper_clip: str | None = None
    coco_year: str | None = None  # the COCO captions file the protocol reads
    source: str = ""  # where the protocol comes from

    def name(self, samples: int) -> str:
        """The name results carry: the paper protocols by their own name, the others with their sample count."""
        return self.key if self.paper else f"{self.key}-{samples}"


PROTOCOLS: dict[str, Protocol] = {
    COCO2017_5K: Protocol(
        key=COCO2017_5K,
        data="MS COCO 2017 val captions, one per image (captions_val2017.json)",
        reference="the same COCO 2017 val images (all 5,000 at N=5,000)",
        image_size=None,
        resize="clean",
        paper=True,
        paper_samples=5000,
        paper_reference_images=5000,
        paper_clip=PAPER_CLIP,
        coco_year="2017",
        source="InstaFlow (Liu et al. 2024), FID-5k and CLIP score table; resize and CLIP prefix not published",
    ),
    COCO2014_30K: Protocol(
        key=COCO2014_30K,
        data="MS COCO 2014 val captions, one per image, 30,000 images (captions_val2014.json)",
        reference="ALL 40,504 COCO 2014 val images",
        image_size=256,
        resize="clean",
        caption_prefix=GIGAGAN_CLIP_PREFIX,
        paper=True,
        paper_samples=30000,
        paper_reference_images=40504,
        paper_resize="clean",
        paper_caption_prefix=GIGAGAN_CLIP_PREFIX,
        paper_clip=PAPER_CLIP,
        coco_year="2014",
        source="GigaGAN's evaluation code (clean-fid, LANCZOS 256, all val2014), cited by InstaFlow for FID-30k",
    ),
    TEACHER: Protocol(
        key=TEACHER,
        data="the holdout prompts (or COCO captions without their images)",
        reference="the teacher's own images on the SAME prompts and seeds (teacher steps / guidance)",
        image_size=None,
        resize="clean",
        source="DMD2 / SenseFlow practice: FID against the teacher",
    ),
    TEACHER_OTHER_SEEDS: Protocol(
        key=TEACHER_OTHER_SEEDS,
        data="the holdout prompts (or COCO captions without their images)",
        reference="the teacher's images on the same prompts from OTHER seeds",
        image_size=None,
        resize="clean",
        source="this project's earlier no-COCO reference",
    ),
    HOLDOUT_IMAGES: Protocol(
        key=HOLDOUT_IMAGES,
        data="holdout captions of an image table (format digits), balanced over classes",
        reference="the held-out real images of the image table",
        image_size=None,
        resize="legacy-tf",
        source="the digits benchmark",
    ),
}
PROTOCOL_KEYS: tuple[str, ...] = (AUTO, *PROTOCOLS)


def coco_protocol(year: str) -> str:
    return COCO2014_30K if year == "2014" else COCO2017_5K


def choose_protocol(
    requested: str, *, coco_year: str | None, coco_images: bool, image_table: bool
) -> Protocol:
    """The protocol a run uses. `auto`: COCO captions with images -> the paper protocol of their year (2017 ->
    coco2017-5k, 2014 -> coco2014-30k); COCO captions without images or holdout prompts -> `teacher`; prompts
    curated from an image table -> `holdout-images`. An explicit protocol must fit the data (ConfigError)."""
    if requested == AUTO:
        if coco_year is not None and coco_images:
            if coco_year not in ("2014", "2017"):
                raise ConfigError(
                    "evaluation.protocol=auto cannot tell the COCO year of evaluation.coco_captions (expected "
                    "captions_val2017.json or captions_val2014.json): set evaluation.protocol"
                )
            return PROTOCOLS[coco_protocol(coco_year)]
        return PROTOCOLS[HOLDOUT_IMAGES if image_table and coco_year is None else TEACHER]
    if requested not in PROTOCOLS:
        raise ConfigError(f"evaluation.protocol={requested!r}: expected one of {', '.join(PROTOCOL_KEYS)}")
    proto = PROTOCOLS[requested]
    if proto.coco_year is not None:
        if coco_year is None or not coco_images:
            raise ConfigError(
                f"evaluation.protocol={requested} needs evaluation.coco_captions (captions_val{proto.coco_year}.json) "
                f"and evaluation.coco_images (val{proto.coco_year}/)"
            )
        if coco_year != proto.coco_year:
            raise ConfigError(
                f"evaluation.protocol={requested} reads COCO {proto.coco_year} val captions, but "
                f"evaluation.coco_captions is COCO {coco_year or '(unknown year)'}"
            )
    if requested == HOLDOUT_IMAGES and (coco_year is not None or not image_table):
        raise ConfigError(
            "evaluation.protocol=holdout-images needs prompts curated from an image table (format digits) "
            "and no evaluation.coco_captions"
        )
    return proto


# ------------------------------------------------------------------------------------------ the run's settings
@dataclass(frozen=True)
class Settings:
    """The protocol with the config's knobs resolved: what actually runs."""

    protocol: Protocol
    samples: int
    image_size: int | None
    resize: str
    caption_prefix: str

    @property
    def name(self) -> str:
        return self.protocol.name(self.samples)

    def cache_material(self) -> dict[str, Any]:
        """What changes the reference features (their cache key)."""
        return {"protocol_size": self.image_size, "resize": self.resize}


def settings(eval_cfg: Any, protocol: Protocol, samples: int) -> Settings:
    """Resolve `evaluation.image_size / resize / caption_prefix` ("protocol" = the protocol's value)."""
    size = protocol.image_size if eval_cfg.image_size == FROM_PROTOCOL else eval_cfg.image_size
    resize = protocol.resize if eval_cfg.resize == FROM_PROTOCOL else eval_cfg.resize
    prefix = protocol.caption_prefix if eval_cfg.caption_prefix == FROM_PROTOCOL else eval_cfg.caption_prefix
    return Settings(protocol, samples, size, resize, prefix)


def run_settings(eval_cfg: Any, eval_set: Any) -> Settings:
    """The settings of an evaluation set built by eval_set.build_eval_set (its `protocol` key and items)."""
    if eval_set.protocol not in PROTOCOLS:
        raise ConfigError(f"evaluation set {eval_set.name!r} has no protocol (build it with build_eval_set)")
    return settings(eval_cfg, PROTOCOLS[eval_set.protocol], len(eval_set.items))


# ------------------------------------------------------------------------------------------------ the label
@dataclass(frozen=True)
class RunFacts:
    """What an evaluation actually ran, as compared against the paper's protocol."""

    protocol: str  # protocol key
    samples: int
    reference_images: int
    image_size: int | None
    resize: str
    fid_network: str  # INCEPTION_WEIGHTS only for the FID Inception with checked weights
    clip_model: str  # hub id / folder / "tiny"
    clip_arch: str | None  # e.g. "ViT-g/14" (from the loaded model's config)
    caption_prefix: str


def _size(v: int | None) -> str:
    return "native" if v is None else f"{v} px"


def not_comparable_because(facts: RunFacts) -> list[str]:
    """Why a result is not comparable with the paper's numbers; empty = paper-comparable. One rule each:
    network, protocol, sample count, image size, CLIP model; and, where the protocol pins them (coco2014-30k),
    reference set size, resize pipeline and CLIP caption prefix."""
    reasons = []
    proto = PROTOCOLS.get(facts.protocol)
    if facts.fid_network != INCEPTION_WEIGHTS:
        reasons.append(
            f"FID network {facts.fid_network}, not the Inception-v3 {INCEPTION_WEIGHTS} weights (hash checked)"
        )
    if proto is None or not proto.paper:
        reasons.append(f"protocol {facts.protocol} is not one of the paper's ({COCO2017_5K}, {COCO2014_30K})")
    if facts.clip_model != PAPER_CLIP or facts.clip_arch != PAPER_CLIP_ARCH:
        reasons.append(
            f"CLIP {facts.clip_model} ({facts.clip_arch or 'unknown architecture'}), not {PAPER_CLIP} "
            f"({PAPER_CLIP_ARCH})"
        )
    if proto is None or not proto.paper:
        return reasons
    if facts.samples != proto.paper_samples:
        reasons.append(f"{facts.samples} samples, {proto.key} uses {proto.paper_samples}")
    if facts.image_size != proto.image_size:
        reasons.append(f"image size {_size(facts.image_size)}, {proto.key} uses {_size(proto.image_size)}")
    if proto.paper_reference_images is not None and facts.reference_images != proto.paper_reference_images:
        reasons.append(
            f"reference set of {facts.reference_images} images, {proto.key} uses {proto.paper_reference_images}"
        )
    if proto.paper_resize is not None and facts.resize != proto.paper_resize:
        reasons.append(f"resize {facts.resize}, {proto.key} uses {proto.paper_resize}")
    if proto.paper_caption_prefix is not None and facts.caption_prefix != proto.paper_caption_prefix:
        reasons.append(
            f"CLIP caption prefix {facts.caption_prefix!r}, {proto.key} uses {proto.paper_caption_prefix!r}"
        )
    return reasons


def fid_network_id(net: Any) -> str:
    """INCEPTION_WEIGHTS for the FID Inception whose weights file passed the hash check, else the net's name."""
    inner = getattr(net, "net", net)
    return getattr(inner, "weights_id", None) or str(getattr(inner, "name", "?"))


def clip_identity(clip_net: Any) -> tuple[str, str | None]:
    """(the configured source, the architecture read from the loaded model) of a CLIP-score network."""
    name = str(getattr(clip_net, "name", "?"))
    return name.removeprefix("clip:"), getattr(clip_net, "arch", None)


def facts_of(run: Settings, fid_net: Any, clip_net: Any, reference_images: int) -> RunFacts:
    """RunFacts of a run from its settings and the loaded networks."""
    clip_source, arch = clip_identity(clip_net)
    return RunFacts(
        protocol=run.protocol.key,
        samples=run.samples,
        reference_images=reference_images,
        image_size=run.image_size,
        resize=run.resize,
        fid_network=fid_network_id(fid_net),
        clip_model=clip_source,
        clip_arch=arch,
        caption_prefix=run.caption_prefix,
    )


def record(run: Settings, facts: RunFacts) -> dict[str, Any]:
    """The protocol part of every result: the name, the settings that ran, and the label with its reasons."""
    reasons = not_comparable_because(facts)
    return {
        "protocol": run.name,
        "protocol_settings": {
            "key": run.protocol.key,
            "data": run.protocol.data,
            "reference": run.protocol.reference,
            "samples": facts.samples,
            "reference_images": facts.reference_images,
            "image_size": "native" if run.image_size is None else run.image_size,
            "resize": run.resize,
            "fid_network": facts.fid_network,
            "clip_model": facts.clip_model,
            "clip_arch": facts.clip_arch,
            "caption_prefix": run.caption_prefix,
        },
        "paper_comparable": not reasons,
        "not_comparable_because": reasons,
    }


# ------------------------------------------------------------------------------------------- resize pipelines
def centre_crop(im: Any, resize: str) -> Any:
    """The largest centred square of a PIL image. legacy-tf offsets by floor((W - S) / 2) (this project's
    earlier crop); clean by round((W - S) / 2), torchvision's center_crop, as GigaGAN's CenterCropLongEdge."""
    w, h = im.size
    s = min(w, h)
    if resize == "clean":
        left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
    else:
        left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def first_resize(img: Any, size: int | None, resize: str) -> np.ndarray:
    """A PIL image or uint8 (H, W, 3) -> centre-cropped uint8 (S, S, 3), resized to `size` unless None (native)
    or already that size: PIL bicubic (legacy-tf) or PIL LANCZOS (clean)."""
    from PIL import Image

    im = Image.fromarray(np.asarray(img, dtype=np.uint8)) if isinstance(img, np.ndarray) else img
    im = centre_crop(im.convert("RGB"), resize)
    if size is not None and im.size[0] != size:
        im = im.resize((size, size), Image.LANCZOS if resize == "clean" else Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def tf1_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> float32 (size, size, C): TensorFlow 1.x resize_bilinear with align_corners=False, i.e.
    source coordinate = output index * (in / out), no half-pixel centres (what torch-fidelity reproduces)."""
    x = np.asarray(x, dtype=np.float32)

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.arange(size, dtype=np.float32) * np.float32(n_in / size)
        lo = np.floor(src).astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)

    y0, y1, dy = axis(x.shape[0])
    x0, x1, dx = axis(x.shape[1])
    dx = dx[None, :, None]
    top = x[y0][:, x0] + (x[y0][:, x1] - x[y0][:, x0]) * dx
    bottom = x[y1][:, x0] + (x[y1][:, x1] - x[y1][:, x0]) * dx
    return top + (bottom - top) * dy[:, None, None]


def pil_bicubic_float(x: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) -> float32 (size, size, 3): PIL bicubic on each channel as a float image, clipped to [0, 255]
    (clean-fid's resize, no rounding in between)."""
    from PIL import Image

    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(x[..., c], dtype=np.float32)).resize(
                (size, size), Image.BICUBIC
            )
        )
        for c in range(x.shape[-1])
    ]
    return np.clip(np.stack(chans, axis=-1), 0.0, 255.0).astype(np.float32)


def second_resize(x: np.ndarray, size: int, resize: str) -> np.ndarray:
    """uint8 (S, S, 3) -> float32 (size, size, 3) at the network's input size (a copy when already that size)."""
    if x.shape[0] == size and x.shape[1] == size:
        return x.astype(np.float32)
    return pil_bicubic_float(x, size) if resize == "clean" else tf1_bilinear(x, size)


def network_input_size(net: Any) -> int | None:
    """The pixel size a feature network takes (None: it takes what it is given, e.g. the digits classifier)."""
    return getattr(net, "input_size", None)


@dataclass
class ProtocolFeatures:
    """A feature network behind a protocol's resize pipeline: every image is centre-cropped, resized to the
    protocol's size, then to the network's input size, before the network sees it. The FID Inception under
    legacy-tf does its second resize itself (torch-fidelity), so it gets the first resize's uint8 pixels."""

    net: Any
    image_size: int | None
    resize: str

    @property
    def name(self) -> str:
        return self.net.name

    @property
    def label(self) -> str:
        return self.net.label

    @property
    def paper_comparable(self) -> bool:
        return bool(self.net.paper_comparable)

    @property
    def metric(self) -> str | None:
        return getattr(self.net, "metric", None)

    def pixels(self, images: np.ndarray | Sequence[Any]) -> list[np.ndarray]:
        """What the network is given for each image: uint8 after the first resize, or float32 [0, 255] at the
        network's input size after the second (uint8 for a network that takes uint8 only)."""
        target = network_input_size(self.net)
        first = [first_resize(im, self.image_size, self.resize) for im in images]
        if target is None or (
            self.resize == "legacy-tf" and getattr(self.net, "resizes_like", None) == "legacy-tf"
        ):
            return first
        out = [second_resize(x, target, self.resize) for x in first]
        if getattr(self.net, "uint8_input", False):
            out = [np.rint(x).clip(0, 255).astype(np.uint8) for x in out]
        return out

    def image_features(self, images: np.ndarray | Sequence[Any]) -> np.ndarray:
        """uint8 images (a (B, H, W, 3) array, or a sequence of differently sized ones) -> float64 (B, D)."""
        pixels = self.pixels(images)
        if not pixels:
            raise ValueError("no images")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(p.shape, []).append(i)
        out: list[np.ndarray | None] = [None] * len(pixels)
        for rows in groups.values():  # one network call per pixel size (native sizes differ)
            feats = self.net.image_features(np.stack([pixels[i] for i in rows]))
            for i, f in zip(rows, feats, strict=True):
                out[i] = f
        return np.stack(out)


def protocol_features(net: Any, run: Settings) -> ProtocolFeatures:
    """The FID network of a run, behind its protocol's resize pipeline."""
    if run.resize not in RESIZES:
        raise ConfigError(f"evaluation.resize={run.resize!r}: expected one of {', '.join(RESIZES)}")
    return ProtocolFeatures(net, run.image_size, run.resize)
