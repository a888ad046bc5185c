"""The evaluation set: COCO captions (FID-5k on val2017, FID-30k on val2014) or, without COCO, holdout prompts.

Which set and which reference follow the protocol (evaluation.protocol, see protocols.py): one caption per image,
chosen deterministically from (seed, image id); `num_samples` images drawn by a seeded permutation of the image ids
(all 5,000 of val2017 for coco2017-5k, 30,000 of the 40,504 of val2014 for coco2014-30k); each sample's noise seed
derives from (seed, image id), so a sample keeps its seed when `num_samples` changes. The coco2014-30k reference is
ALL val2014 images (GigaGAN's protocol), not only the sampled ones. Real and generated images are resized by the
protocol's pipeline (protocols.ProtocolFeatures) before any feature network sees them.

Without COCO images (the tiny preset) the captions are the holdout split of the prompts table (or the COCO
captions) and the reference set is the teacher's own images on the SAME prompts and seeds (protocol `teacher`;
`teacher-other-seeds` keeps the earlier reference from other seeds): the set is named so in every result, and its
numbers measure closeness to the teacher, not to real photos.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from instaflow_core.errors import DataError
from instaflow_core.evaluation import protocols as P

HOLDOUT_SET = "holdout-prompts"
TEACHER_REFERENCE = "teacher-generations"  # the teacher's images on the same prompts from other seeds
TEACHER_SAME_SEEDS = "teacher-same-seeds"  # the teacher's images on the same prompts and seeds
TEACHER_REFERENCES = (TEACHER_REFERENCE, TEACHER_SAME_SEEDS)
COCO_REFERENCE = "coco-images"
IMAGE_TABLE_REFERENCE = "image-table"  # an image source's held-out real images (curation/images.py)


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from a hash of the parts (stable across processes, platforms and batch compositions)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class EvalItem:
    prompt: str
    seed: int
    key: str  # image id (COCO) or prompt id#repeat (holdout)
    image_file: str | None = None  # relative to the images folder (COCO only)


@dataclass
class EvalSet:
    """The prompts + seeds every model is evaluated on, and where the reference images come from."""

    name: str  # coco2017-val | coco2014-val | coco-<file stem> | holdout-prompts
    items: list[EvalItem]
    reference: str  # "coco-images" | "teacher-same-seeds" | "teacher-generations" | "image-table"
    source: str  # the captions file / prompts table key
    images_root: str | None = None
    note: str = ""
    # the reference items when they are not `items`: the teacher's other seeds, or every val2014 image (30k)
    reference_items: list[EvalItem] = field(default_factory=list)
    protocol: str = ""  # the protocol key (protocols.PROTOCOLS); build_eval_set sets it

    @property
    def prompts(self) -> list[str]:
        return [it.prompt for it in self.items]

    @property
    def seeds(self) -> list[int]:
        return [it.seed for it in self.items]

    def ref_items(self) -> list[EvalItem]:
        """The items of the reference image set: `reference_items` when given, else the evaluated items."""
        return self.reference_items or self.items

    @property
    def protocol_name(self) -> str:
        """coco2017-5k, coco2014-30k, teacher-<N>, ... ("" before build_eval_set chose the protocol)."""
        return P.PROTOCOLS[self.protocol].name(len(self.items)) if self.protocol in P.PROTOCOLS else ""

    def key(self) -> str:
        """Identifies the reference image set (the cache key of its feature statistics, with the network)."""
        ref = self.ref_items()
        blob = json.dumps(
            [self.name, self.source, self.images_root, [(it.key, it.image_file, it.seed) for it in ref]],
            sort_keys=True,
        )
        return f"{self.name}-{len(ref)}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def describe(self, label: dict[str, Any] | None = None) -> dict[str, Any]:
        """Small JSON-able summary for results (no item list). `label` is protocols.record(...) (the protocol's
        settings and the paper-comparable label, which need the networks); without it nothing is comparable."""
        return {
            "name": self.name,
            "samples": len(self.items),
            "reference": self.reference,
            "reference_images": len(self.ref_items()),
            "source": self.source,
            "images_root": self.images_root,
            "note": self.note,
            "protocol": self.protocol_name,
            "paper_comparable": False,
            "not_comparable_because": ["not labelled (the networks were not known)"],
            **(label or {}),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalSet:
        d = dict(d)
        d["items"] = [EvalItem(**x) for x in d["items"]]
        d["reference_items"] = [EvalItem(**x) for x in d.get("reference_items", [])]
        return cls(**d)


# ---------------------------------------------------------------------------------------------- COCO
def coco_set_name(filename: str, data: dict[str, Any]) -> str:
    """coco2017-val / coco2014-val from the file name (captions_val2017.json), else from the info block."""
    text = filename.lower()
    for year in ("2017", "2014"):
        if year in text:
            return f"coco{year}-val"
    year = str(data.get("info", {}).get("year", ""))
    return f"coco{year}-val" if year in ("2017", "2014") else "coco-captions"


def one_caption_per_image(data: dict[str, Any], seed: int) -> list[tuple[int, str, str]]:
    """[(image_id, file_name, caption)] sorted by image id; the caption is picked by hash of (seed, image id)
    among that image's captions in annotation-id order (deterministic, independent of file order)."""
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise DataError("COCO captions file: expected a JSON object with 'images' and 'annotations'")
    files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
    caps: dict[int, list[tuple[int, str]]] = {}
    for ann in data["annotations"]:
        caps.setdefault(int(ann["image_id"]), []).append(
            (int(ann.get("id", 0)), " ".join(str(ann["caption"]).split()))
        )
    out = []
    for image_id in sorted(caps):
        if image_id not in files:
            continue
        options = sorted(caps[image_id])
        _, caption = options[derived_seed("caption", seed, image_id) % len(options)]
        out.append((image_id, files[image_id], caption))
    if not out:
        raise DataError("COCO captions file has no captions for its images")
    return out


def coco_eval_set(
    captions_json: bytes | dict[str, Any],
    *,
    source: str,
    num_samples: int,
    seed: int,
    images_root: str | None,
    all_images_reference: bool = False,
    teacher_reference: str = TEACHER_SAME_SEEDS,
) -> EvalSet:
    """The COCO evaluation set: `num_samples` images (seeded choice), one caption each, one noise seed each.

    With `images_root` the reference is the chosen images, or with `all_images_reference` every image the
    captions file lists (coco2014-30k: all 40,504 val2014 images). Without it the teacher's images stand in:
    on the same seeds (`teacher_reference=TEACHER_SAME_SEEDS`) or other seeds (TEACHER_REFERENCE)."""
    if isinstance(captions_json, (bytes, bytearray)):
        try:
            data = json.loads(captions_json)
        except (ValueError, UnicodeDecodeError) as err:
            raise DataError(f"{source}: not valid JSON ({err})") from err
    else:
        data = captions_json
    rows = one_caption_per_image(data, seed)
    if num_samples > len(rows):
        raise DataError(
            f"evaluation.num_samples={num_samples} but {source} has only {len(rows)} captioned images"
        )
    order = np.random.default_rng(seed).permutation(len(rows))[:num_samples]
    chosen = [rows[i] for i in sorted(order)]  # keep image-id order: stable, readable
    items = [
        EvalItem(prompt=cap, seed=derived_seed("noise", seed, image_id), key=str(image_id), image_file=fname)
        for image_id, fname, cap in chosen
    ]
    name = coco_set_name(source.rsplit("/", 1)[-1], data)
    if images_root:
        every = []
        if all_images_reference:
            every = [
                EvalItem(prompt="", seed=0, key=str(int(im["id"])), image_file=str(im["file_name"]))
                for im in sorted(data["images"], key=lambda im: int(im["id"]))
            ]
        ref_note = f"the reference is all {len(every)} images of the file" if every else "the same images"
        return EvalSet(
            name=name,
            items=items,
            reference=COCO_REFERENCE,
            source=source,
            images_root=images_root,
            note=f"{name}: {num_samples} images, one caption each; {ref_note}; real and generated images resized alike",
            reference_items=every,
        )
    # Captions without the image folder: the teacher's images stand in for the real images.
    return _teacher_set(
        name, items, source, teacher_reference, seed, f"{name} captions without evaluation.coco_images"
    )


def _teacher_set(
    name: str, items: list[EvalItem], source: str, reference: str, seed: int, what: str
) -> EvalSet:
    if reference == TEACHER_SAME_SEEDS:
        return EvalSet(
            name=name,
            items=items,
            reference=TEACHER_SAME_SEEDS,
            source=source,
            note=(
                f"{what}: the reference set is the teacher's own images on the same prompts and seeds, so FID "
                "measures closeness to the teacher, not to real images (not paper-comparable)"
            ),
        )
    ref = [EvalItem(it.prompt, derived_seed("reference", seed, it.key), it.key) for it in items]
    return EvalSet(
        name=name,
        items=items,
        reference=TEACHER_REFERENCE,
        source=source,
        note=(
            f"{what}: the reference set is the teacher's own generations from other seeds, so FID measures "
            "closeness to the teacher, not to real images (not paper-comparable)"
        ),
        reference_items=ref,
    )


# ------------------------------------------------------------------------------------------- holdout
def holdout_eval_set(
    prompts: Sequence[tuple[str, str]],
    *,
    source: str,
    num_samples: int,
    seed: int,
    teacher_reference: str = TEACHER_SAME_SEEDS,
) -> EvalSet:
    """From (prompt_id, text) holdout rows: `num_samples` items (prompts repeat with new seeds when there are
    fewer); the reference is the teacher's images on the same seeds, or (TEACHER_REFERENCE) as many items from
    other seeds."""
    rows = sorted({pid: text for pid, text in prompts}.items())
    if not rows:
        raise DataError(
            f"{source}: no holdout prompts to evaluate on (curation.holdout_fraction > 0 is needed)"
        )
    order = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]

    def pick(tag: str) -> list[EvalItem]:
        out = []
        for i in range(num_samples):
            pid, text = order[i % len(order)]
            rep = i // len(order)
            out.append(EvalItem(prompt=text, seed=derived_seed(tag, seed, pid, rep), key=f"{pid}#{rep}"))
        return out

    es = _teacher_set(HOLDOUT_SET, pick("noise"), source, teacher_reference, seed, "")
    es.note = f"no COCO configured: {len(rows)} holdout prompts" + es.note
    if teacher_reference == TEACHER_REFERENCE:
        es.reference_items = pick("reference")
    return es


# -------------------------------------------------------------------------------------------- images
def resize_square(img: Any, size: int) -> np.ndarray:
    """A PIL image or uint8 (H, W, 3) array -> centre-cropped, PIL-bicubic-resized uint8 (size, size, 3) (the
    legacy-tf protocol's first resize)."""
    return P.first_resize(img, size, "legacy-tf")


def resize_batch(images: Any, size: int | None) -> Any:
    """uint8 (B, H, W, 3) -> (B, size, size, 3) (legacy-tf first resize). None: the images as they are (the
    protocol's resize runs in protocols.ProtocolFeatures, in front of the feature network)."""
    if size is None:
        return images
    return np.stack([resize_square(im, size) for im in images]) if len(images) else images


def load_images(
    read_bytes: Callable[[str], bytes], images_root: str, files: Sequence[str], size: int | None = None
) -> np.ndarray | list[np.ndarray]:
    """Read COCO images `images_root/<file>` (local path or store URI) -> uint8 (N, size, size, 3); with size None
    the decoded RGB images as they are (a list: their sizes differ), for the protocol's resize pipeline."""
    from PIL import Image, UnidentifiedImageError

    root = images_root.rstrip("/")
    out = []
    for f in files:
        path = f"{root}/{f}"
        try:
            data = read_bytes(path)
        except FileNotFoundError as err:
            raise DataError(
                f"COCO image not found: {path} (is evaluation.coco_images the matching folder?)"
            ) from err
        try:
            with Image.open(io.BytesIO(data)) as im:
                rgb = im.convert("RGB")
            out.append(np.asarray(rgb, dtype=np.uint8) if size is None else resize_square(rgb, size))
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path}: not a readable image ({err})") from err
    return out if size is None else np.stack(out)


# ------------------------------------------------------------------------------------------ from config
def holdout_prompts(store: Any, prompts_ref: Any) -> list[tuple[str, str]]:
    """(prompt_id, text) of the holdout split of a prompts table at the TableRef's version."""
    from instaflow_core.store import open_ref

    table = open_ref(store, prompts_ref)
    with store.guard(f"read holdout prompts of {prompts_ref.key()}"):
        data = table.to_lance().to_table(columns=["prompt_id", "text"], filter="split = 'holdout'")
    return list(zip(data.column("prompt_id").to_pylist(), data.column("text").to_pylist(), strict=True))


def build_eval_set(eval_cfg: Any, store: Any, prompts_ref: Any = None) -> EvalSet:
    """The evaluation set of the config's protocol (`evaluation.protocol`, protocols.choose_protocol): COCO
    captions + images (coco2017-5k / coco2014-30k), COCO captions or the holdout prompts of `prompts_ref` with the
    teacher's images as the reference (teacher, teacher-other-seeds), or an image table's held-out images
    (holdout-images). The chosen protocol's key is in `EvalSet.protocol`."""
    requested = getattr(eval_cfg, "protocol", P.AUTO)
    teacher_ref = TEACHER_REFERENCE if requested == P.TEACHER_OTHER_SEEDS else TEACHER_SAME_SEEDS
    if eval_cfg.coco_captions:
        path = eval_cfg.coco_captions
        try:
            data = store.read_bytes(path)
        except FileNotFoundError as err:
            raise DataError(f"evaluation.coco_captions: {path} not found") from err
        try:
            parsed = json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
        year = coco_set_name(path.rsplit("/", 1)[-1], parsed if isinstance(parsed, dict) else {})
        year = year.removeprefix("coco").removesuffix("-val") if year != "coco-captions" else ""
        proto = P.choose_protocol(
            requested, coco_year=year, coco_images=bool(eval_cfg.coco_images), image_table=False
        )
        es = coco_eval_set(
            parsed,
            source=path,
            num_samples=eval_cfg.num_samples,
            seed=eval_cfg.seed,
            images_root=eval_cfg.coco_images if proto.coco_year else None,
            all_images_reference=proto.key == P.COCO2014_30K,
            teacher_reference=teacher_ref,
        )
        es.protocol = proto.key
        return es
    if eval_cfg.coco_images:
        raise DataError(
            "evaluation.coco_images is set but evaluation.coco_captions is not: give captions_val2017.json too"
        )
    if prompts_ref is None:
        raise DataError("no evaluation captions: set evaluation.coco_captions or pass the prompts table")
    from instaflow_core.curation.images import image_source_of, images_of  # curation imports no evaluation

    images = images_of(store, prompts_ref)
    proto = P.choose_protocol(requested, coco_year=None, coco_images=False, image_table=images is not None)
    if (
        proto.key == P.HOLDOUT_IMAGES
    ):  # prompts curated from an image source: its own set (held-out real images)
        es = image_source_of(store, images).eval_set(store, images, eval_cfg.num_samples, eval_cfg.seed)
    else:
        es = holdout_eval_set(
            holdout_prompts(store, prompts_ref),
            source=prompts_ref.key(),
            num_samples=eval_cfg.num_samples,
            seed=eval_cfg.seed,
            teacher_reference=teacher_ref,
        )
    es.protocol = proto.key
    return es
