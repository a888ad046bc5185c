"""What a saved model folder (2-RF, InstaFlow) holds: exactly what its pipeline loads, nothing else.

A base such as the SD 1.5, SDXL, SD 3.5 or FLUX repo also holds multi-GB root checkpoints
(`v1-5-pruned*.safetensors`, `sd_xl_base_1.0.safetensors`, `flux1-dev.safetensors`), fp16 / non-EMA / `.bin`
duplicates of every network, ONNX exports and a safety checker with its feature extractor. A model made from
it keeps only

    model_index.json   the base's, the pipeline components only (safety_checker / feature_extractor null)
    unet/ | transformer/    the new weights (the family's denoiser)
    vae/ text_encoder*/     config + the full-precision weights (safetensors, shards with their index;
                            .bin only when a folder has nothing else)
    tokenizer*/ scheduler/

and, with `models.save_variants=true`, fp16 copies (`*.fp16.safetensors`) of the networks beside them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from instaflow_core.models.sources import UNUSED_COMPONENTS, is_variant, pipeline_components

WEIGHT_SUFFIXES = (".safetensors", ".bin")
FP16 = "fp16"


def component_files(folder: Path) -> list[Path]:
    """The files of one component folder that a pipeline loads: configs, tokenizer files, main weights.

    Full-precision safetensors when there are any, else the `.bin` files (a pickle-only base, allow_pickle).
    """
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES and not is_variant(p.name)]
    safe = [p for p in weights if p.suffix == ".safetensors"]
    keep_weights = safe or weights
    others = [p for p in files if p.suffix not in WEIGHT_SUFFIXES and not p.name.startswith(".")]
    others = [p for p in others if ".fp16." not in p.name and ".non_ema." not in p.name]
    return others + keep_weights


def model_index(base: Path, keep: tuple[str, ...]) -> dict[str, Any]:
    """The base's model_index.json with every component outside `keep` set to null (as diffusers writes an
    absent optional component), and `requires_safety_checker` false where the pipeline has the flag."""
    f = base / "model_index.json"
    index: dict[str, Any] = json.loads(f.read_text()) if f.is_file() else {}
    for key in pipeline_components(index) + [k for k in UNUSED_COMPONENTS if k in index]:
        if key not in keep:
            index[key] = [None, None]
    if "requires_safety_checker" in index or "safety_checker" in index:
        index["requires_safety_checker"] = False
    return index


def copy_components(
    base: Path, out: Path, components: tuple[str, ...], *, variants: bool = False, denoiser: str = "unet"
) -> None:
    """Copy `components` of the base folder into `out` (see the module docstring) and write model_index.json,
    which keeps those and the `denoiser` (written by the caller)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in components:
        src = base / name
        if not src.is_dir():
            continue
        dest = out / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in component_files(src):
            shutil.copy2(f, dest / f.name)
        if variants and _is_network(src):
            existing = [f for f in src.iterdir() if f".{FP16}." in f.name and f.suffix == ".safetensors"]
            for f in existing:
                shutil.copy2(f, dest / f.name)
            if not existing:
                write_fp16_variant(dest)
    index = model_index(base, (*components, denoiser))
    if "scheduler" in components and (out / "scheduler" / "scheduler_config.json").is_file():
        cls = json.loads((out / "scheduler" / "scheduler_config.json").read_text()).get("_class_name")
        if cls:
            index["scheduler"] = ["diffusers", cls]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_fp16_variant(folder: Path) -> list[Path]:
    """`<name>.fp16.safetensors` beside each full-precision safetensors file of a component folder."""
    from safetensors.torch import load_file, save_file

    written = []
    for f in sorted(folder.glob("*.safetensors")):
        if is_variant(f.name):
            continue
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
        stem = f.name[: -len(".safetensors")]
        target = folder / f"{stem}.{FP16}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(target), metadata={"format": "pt"})
        written.append(target)
    return written


def _is_network(folder: Path) -> bool:
    """A component folder with weights (not a tokenizer or scheduler)."""
    return (folder / "config.json").is_file() and any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir())


def weights_bytes(folder: Path) -> int:
    """Bytes of the full-precision network weights of a model folder (what its size should be close to)."""
    return sum(
        f.stat().st_size
        for sub in sorted(folder.iterdir())
        if sub.is_dir()
        for f in sub.iterdir()
        if f.suffix in WEIGHT_SUFFIXES and not is_variant(f.name)
    )
