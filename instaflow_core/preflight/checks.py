"""The preflight checks: each takes config sections and returns the problems it found, one line each.

None of them loads model weights or writes anything (the S3 check's probe object is deleted at once), so a
run that would fail after hours of upstream work fails in seconds instead, with every problem named.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path
from typing import Any

from instaflow_core.config import (
    PRETRAINED_TEACHER,
    CurationConfig,
    DistillationConfig,
    EvaluationConfig,
    InstaflowConfig,
    ModelsConfig,
    RegistrationConfig,
    StorageConfig,
    TrainConfig,
)
from instaflow_core.errors import ConfigError, InstaflowError
from instaflow_core.evaluation.names import EXPERIMENT_NETWORKS
from instaflow_core.models.family import ModelFamily, family_of_index
from instaflow_core.models.geometry import Geometry, tiny_geometry
from instaflow_core.models.sources import (
    PICKLE_SUFFIXES,
    hub_snapshot,
    is_hub_id,
    missing_files,
    model_configs,
)

TINY = "tiny"  # the stand-in networks' name (training.lpips.TINY, evaluation's tiny CLIP / FID features)
DINOV2 = "facebook/dinov2-large"  # evaluation.feature_nets.DEFAULT_DINOV2
RESOLUTIONS = ("generation.resolution", "distillation.pairs.resolution", "evaluation.resolution")
# key prefixes of original-format checkpoints: SD / SDXL / SD3 (LDM / SGM layouts), FLUX (BFL's)
SINGLE_FILE_MARKERS = ("model.diffusion_model.", "double_blocks.", "single_blocks.")


class PreflightError(ConfigError):
    """Every problem the preflight found: one line each, under a header."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} found before any work started (nothing was written):"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _local(path: str) -> Path:
    return Path(path[len("file://") :] if path.startswith("file://") else path).expanduser()


# ------------------------------------------------------------------------------------------------ teacher
def teacher_problems(models: ModelsConfig, storage: StorageConfig) -> tuple[list[str], Geometry | None]:
    """The teacher resolves (folder, file, hub id in the cache, s3:// folder) and its configs read; no weights.

    Returns the problems and the teacher's Geometry (None when it could not be read)."""
    src = models.teacher
    if src == TINY:
        return [], tiny_geometry(models.tiny)
    if src == PRETRAINED_TEACHER:  # trained by the pretrain stage from digits.model: nothing to resolve yet
        return [], None
    what = f"models.teacher={src!r}"
    try:
        if src.startswith("s3://"):
            return _family_geometry(src, storage, models)
        local = src[len("file://") :] if src.startswith("file://") else src
        if is_hub_id(local):
            return _hub_teacher(local, models)
        path = _local(src)
        if not path.exists():
            return [
                f"{what}: no such folder or file (give a diffusers folder, a .safetensors file or owner/name)"
            ], None
        if path.is_file():
            return single_file_problems(path, models)
        missing = missing_files(path, models.allow_pickle)
        if missing:
            return [f"{what}: not a loadable diffusers folder (missing {', '.join(missing)})"], None
        return _family_geometry(str(path))
    except InstaflowError as err:
        return [f"models.teacher: {_first_line(err)}"], None


def _family_geometry(
    uri: str | Path, storage: StorageConfig | None = None, models: ModelsConfig | None = None
) -> tuple[list[str], Geometry | None]:
    """The teacher's family from its model_index.json (an unknown pipeline class is an error), what that family
    finds missing in it (`ModelFamily.index_problems`: a text encoder or tokenizer named null), and the latent
    geometry from the component configs."""
    index, configs = model_configs(str(uri), storage, models)
    family = family_of_index(index, str(uri))
    problems = [f"models.teacher: {p}" for p in family.index_problems(index)]
    return (problems, None) if problems else ([], family.geometry(configs))


def teacher_family(models: ModelsConfig, storage: StorageConfig) -> ModelFamily | None:
    """The teacher's model family from its configs (None when they cannot be read, which `teacher_problems`
    reports, for a single checkpoint file, and for a teacher the pretrain stage trains)."""
    src = models.teacher
    # the tiny teacher: importing its family's module would cost the preflight seconds of diffusers import; its
    # sampler refuses a wrong name in one line when generation starts
    if src in (TINY, PRETRAINED_TEACHER) or _is_file(src):
        return None
    try:
        index, _ = model_configs(src, storage, models)
        return family_of_index(index, src)
    except InstaflowError:
        return None


def _is_file(src: str) -> bool:
    if src.startswith("s3://"):
        return False
    local = src[len("file://") :] if src.startswith("file://") else src
    return not is_hub_id(local) and _local(src).is_file()


def setting_problems(cfg: InstaflowConfig) -> list[str]:
    """Run settings the teacher's family cannot take (`ModelFamily.setting_problems`: its sampler names, guidance
    where it has none), one line each."""
    family = teacher_family(cfg.models, cfg.storage)
    return [] if family is None else family.setting_problems(cfg)


def _hub_teacher(repo: str, models: ModelsConfig) -> tuple[list[str], Geometry | None]:
    """Offline (the default): the cached snapshot must hold every file loading needs. Online: the configs must
    download (weights are fetched when the teacher first loads)."""
    folder = hub_snapshot(
        repo,
        revision=models.teacher_revision,
        local_files_only=models.local_files_only,
        allow_pickle=models.allow_pickle,
        configs_only=not models.local_files_only,
    )
    missing = missing_files(folder, models.allow_pickle) if models.local_files_only else []
    if missing:
        return [
            f"models.teacher={repo!r}: the cached snapshot lacks {', '.join(missing)}: download it "
            f"(huggingface-cli download {repo}) or set models.local_files_only=false"
        ], None
    return _family_geometry(folder)


class _LazyCheckpoint(dict):
    """Tensor shapes of a safetensors file on demand: what diffusers' model-type inference reads."""

    def __init__(self, handle: object) -> None:
        super().__init__({k: None for k in handle.keys()})  # type: ignore[attr-defined]
        self._handle = handle

    def __getitem__(self, key: str) -> object:
        import torch

        return torch.empty(self._handle.get_slice(key).get_shape(), device="meta")  # type: ignore[attr-defined]


def single_file_problems(path: Path, models: ModelsConfig) -> tuple[list[str], Geometry | None]:
    """A single checkpoint: readable, a model type diffusers recognises, and (offline) its config repo cached."""
    what = f"models.teacher={str(path)!r}"
    if path.suffix in PICKLE_SUFFIXES:
        if not models.allow_pickle:
            return [
                f"{what}: pickle checkpoints can run arbitrary code when loaded; convert it to .safetensors or "
                "set models.allow_pickle=true if you trust it"
            ], None
        return [], None
    if path.suffix != ".safetensors":
        return [f"{what}: not a .safetensors checkpoint"], None
    try:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            checkpoint = _LazyCheckpoint(handle)
            if not any(k.startswith(SINGLE_FILE_MARKERS) for k in checkpoint):
                return [
                    f"{what}: no denoiser keys (not an original-format SD / SDXL / SD3 / FLUX checkpoint)"
                ], None
            repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    except Exception as err:  # noqa: BLE001 - a damaged file raises many error types
        return [f"{what}: unreadable checkpoint ({_first_line(err)})"], None
    if not models.local_files_only:
        return [], None
    try:
        folder = hub_snapshot(repo, local_files_only=True, configs_only=True)
    except Exception:  # noqa: BLE001
        return [
            f"{what} needs the component configs of {repo!r}, which are not cached: download them "
            f"(huggingface-cli download {repo} --include '*.json' '*.txt') or set models.local_files_only=false"
        ], None
    return _family_geometry(folder)


def resolution_problems(cfg: InstaflowConfig, geometry: Geometry | None) -> list[str]:
    """Every resolution setting is a size the teacher's VAE and UNet down-sampling divide."""
    if geometry is None:
        return []
    values = {
        "generation.resolution": cfg.generation.resolution,
        "distillation.pairs.resolution": cfg.distillation.pairs.resolution,
        "evaluation.resolution": cfg.evaluation.resolution,
    }
    return [p for name, value in values.items() if (p := geometry.problem(value, name))]


# ------------------------------------------------------------------------------------------------ memory
def memory_problems(cfg: InstaflowConfig) -> list[str]:
    """Each training section with `gpu_memory_gb` set (reflow, distillation): the student's training memory per
    process, estimated from the teacher's configs before any work, fits the budget; one line per section that
    does not, naming what would make it fit.

    The estimate is `training/memory.py`'s formula over counts from `models/footprint.py`: the denoiser's
    parameters built from its config on the meta device (no weights read), its activations counted on fake
    tensors at the section's resolution (reflow: generation.resolution, distillation: distillation.pairs
    .resolution; None = native) and largest micro-batch, under the section's mixed precision and gradient
    checkpointing. The student has the teacher's architecture in both stages. Teachers without component
    configs to read (tiny, the pretrained digits model, a single checkpoint file) are not estimated."""
    sections = [
        (name, section, resolution)
        for name, section, resolution in (
            ("reflow", cfg.reflow, cfg.generation.resolution),
            ("distillation", cfg.distillation, cfg.distillation.pairs.resolution),
        )
        if section.gpu_memory_gb is not None
    ]
    src = cfg.models.teacher
    if not sections or src in (TINY, PRETRAINED_TEACHER) or _is_file(src):
        return []
    try:
        index, configs = model_configs(src, cfg.storage, cfg.models)
        family = family_of_index(index, src)
        shapes = [(n, s, family.geometry(configs).latent_shape(r, n)) for n, s, r in sections]
    except InstaflowError:
        return []  # the teacher and resolution checks name what is wrong
    out = []
    counted: dict[tuple, Any] = {}  # reflow and distillation at the same size count once
    for name, section, latent_shape in shapes:
        try:
            problem = _memory_problem(name, section, family, index, configs, latent_shape, counted)
        except (InstaflowError, NotImplementedError, RuntimeError, KeyError, ValueError) as err:
            problem = (
                f"{name}.gpu_memory_gb={section.gpu_memory_gb:g}: cannot estimate the {family.name} student's "
                f"memory ({_first_line(err)}); unset it to skip the check"
            )
        if problem:
            out.append(problem)
    return out


def _memory_problem(
    name: str,
    section: TrainConfig,
    family: ModelFamily,
    index: dict[str, Any],
    configs: dict[str, dict[str, Any]],
    latent_shape: tuple[int, int, int],
    counted: dict[tuple, Any],
) -> str | None:
    """The one-line verdict for a section (None: it fits): the estimate of the plan as configured, then what fits
    instead: gradient checkpointing, a smaller micro-batch, FSDP over more GPUs."""
    from instaflow_core.models import footprint
    from instaflow_core.training import memory

    budget = float(section.gpu_memory_gb or 0)
    gc, fsdp, n = section.gradient_checkpointing, section.fsdp.enabled, section.num_processes
    micro = max(st.micro_batch_size or max(1, st.batch_size // n) for st in section.stages)
    params = footprint.parameter_count(index, configs, family.denoiser)
    latents = (
        4 * 4 * int(latent_shape[0]) * int(latent_shape[1]) * int(latent_shape[2])
    )  # x0, x1, x_t, target
    common: dict[str, Any] = dict(
        mixed_precision=section.mixed_precision,
        use_8bit_adam=section.use_8bit_adam,
        largest_block=footprint.largest_block(index, configs, family.denoiser),
        frozen_params=footprint.parameter_count(index, configs, "vae") if "vae" in configs else 0,
        batch_bytes_per_sample=footprint.condition_bytes(family, configs) + latents,
    )

    def plan(checkpointing: bool, batch: int, processes: int, sharded: bool) -> memory.MemoryEstimate:
        key = (tuple(latent_shape), section.mixed_precision, checkpointing)
        if key not in counted:
            counted[key] = footprint.count_activations(
                family, index, configs, latent_shape,
                mixed_precision=section.mixed_precision, gradient_checkpointing=checkpointing,
            )  # fmt: skip
        a = counted[key]
        return memory.estimate(
            params, a.fixed, a.per_sample, micro_batch=batch, gradient_checkpointing=checkpointing,
            processes=processes, fsdp=sharded, **common,
        )  # fmt: skip

    est = plan(gc, micro, n, fsdp)
    if est.fits(budget):
        return None
    advice = []
    if not gc and (with_gc := plan(True, micro, n, fsdp)).fits(budget):
        advice.append(f"turn on {name}.gradient_checkpointing (~{memory.gb(with_gc.total)} GB)")
    for checkpointing in (gc, True) if not gc else (True,):
        fit = next((b for b in range(micro - 1, 0, -1) if plan(checkpointing, b, n, fsdp).fits(budget)), 0)
        if fit:
            how = "turn on gradient checkpointing and " if checkpointing != gc else ""
            advice.append(f"{how}lower micro_batch_size to {fit}")
            break
    shards = next((k for k in range(max(2, n), 65) if plan(True, micro, k, True).fits(budget)), None)
    if shards is not None and not (fsdp and shards <= n):
        also = "" if gc else ", gradient checkpointing on"
        advice.append(f"use FSDP over {shards} GPUs ({name}.fsdp.enabled=true, num_processes={shards}{also})")
    what = f"micro-batch {micro}, {'with' if gc else 'without'} gradient checkpointing"
    if n > 1:
        what += f", {n} processes ({'FSDP' if fsdp else 'DDP'})"
    fix = " / ".join(advice) or "nothing here fits it: a GPU with more memory, or a smaller resolution"
    return (
        f"{name} on {budget:g} GB: {est.line()} for a {params / 1e9:.3g}B-parameter {family.name} student at "
        f"{what}, latents {tuple(latent_shape)}: {fix}"
    )


# ---------------------------------------------------------------------------------------------- weights
def lpips_problems(distill: DistillationConfig) -> list[str]:
    """A distillation stage with loss `lpips` needs LPIPS weights (and the lpips package for real ones)."""
    stages = [i for i, st in enumerate(distill.stages) if st.loss == "lpips"]
    if not stages:
        return []
    weights = distill.lpips_weights
    if weights is None:
        return [
            f"distillation.stages.{stages[0]} uses loss lpips but distillation.lpips_weights is not set: give a "
            "local LPIPS weights file (lpips/weights/v0.1/vgg.pth or a full LPIPS state dict), or "
            "lpips_weights=tiny for the random stand-in"
        ]
    if weights == TINY:
        return []
    out = []
    if not _local(weights).is_file():
        out.append(f"distillation.lpips_weights={weights!r}: file not found")
    if importlib.util.find_spec("lpips") is None:
        out.append(
            "distillation.lpips_weights needs the lpips package: pip install lpips (and a working torchvision)"
        )
    return out


def pretrained_problems(source: str, what: str, local_files_only: bool) -> list[str]:
    """A transformers model named by a local folder or a hub id: the folder exists, or the id is cached."""
    if _local(source).is_dir():
        return []
    if not is_hub_id(source):
        return [f"{what}={source!r}: no such folder (give a local transformers folder or a hub id)"]
    if not local_files_only:
        return []  # downloaded when first used
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(source, local_files_only=True, allow_patterns=["*.json"])
    except Exception:  # noqa: BLE001
        return [
            f"{what}={source!r} is not in the local Hugging Face cache: download it (huggingface-cli download "
            f"{source}), give a local folder, or set models.local_files_only=false"
        ]
    return []


def evaluation_problems(ev: EvaluationConfig, models: ModelsConfig, storage: StorageConfig) -> list[str]:
    """COCO captions / images exist when named; the FID feature network and the CLIP model resolve."""
    out = []
    if ev.coco_captions and not _exists(ev.coco_captions, storage):
        out.append(f"evaluation.coco_captions: {ev.coco_captions} not found")
    if ev.coco_images:
        if not ev.coco_captions:
            out.append(
                "evaluation.coco_images is set but evaluation.coco_captions is not: give captions_val2017.json too"
            )
        if not _exists(ev.coco_images, storage):
            out.append(f"evaluation.coco_images: {ev.coco_images} not found")
    lfo = models.local_files_only
    fid = ev.fid_features
    if fid == "inception":
        if importlib.util.find_spec("torch_fidelity") is None:
            out.append(
                "evaluation.fid_features=inception needs torch-fidelity (pip install torch-fidelity, which needs a "
                "working torchvision); or use fid_features=dinov2, clip or tiny (labelled as not FID)"
            )
        if ev.inception_weights is None and lfo:
            out.append(
                "evaluation.inception_weights is not set: give the local path of pt_inception-2015-12-05-6726825d.pth"
                " (or set models.local_files_only=false to let torch-fidelity download it)"
            )
        elif ev.inception_weights and not _local(ev.inception_weights).is_file():
            out.append(f"evaluation.inception_weights={ev.inception_weights!r}: file not found")
    elif fid == "dinov2":
        out += pretrained_problems(DINOV2, "evaluation.fid_features=dinov2 needs", lfo)
    elif fid not in (TINY, "clip", *EXPERIMENT_NETWORKS):
        out += pretrained_problems(fid, "evaluation.fid_features", lfo)
    if ev.clip_model not in (
        TINY,
        *EXPERIMENT_NETWORKS,
    ):  # the digits classifier is trained by the evaluation itself
        out += pretrained_problems(ev.clip_model, "evaluation.clip_model", lfo)
    return out


def _exists(path: str, storage: StorageConfig) -> bool:
    if path.startswith("s3://"):
        from instaflow_core.store.uri import Store

        try:
            return Store(storage).exists(path)
        except InstaflowError:
            return False
    return _local(path).exists()


# ------------------------------------------------------------------------------------------------ data
def source_problems(curation: CurationConfig, storage: StorageConfig) -> list[str]:
    """Every caption source matches readable files of a known format."""
    from instaflow_core.curation.readers import detect_format, resolve_paths

    if not curation.sources:
        return ["curation.sources is empty: name at least one caption file (path, format, column)"]
    out = []
    for i, src in enumerate(curation.sources):
        if src.format == "digits":  # scikit-learn's bundled images (curation/images.py): no file to find
            if importlib.util.find_spec("sklearn") is None:
                out.append(
                    f"curation.sources.{i}: format digits needs scikit-learn (pip install scikit-learn)"
                )
            continue
        try:
            fs = _source_fs(src.path, storage)
            _, files = resolve_paths(src.path, fs)
            if src.format == "auto":
                detect_format(files[0])
            local = [f for f in files if "://" not in f]
            unreadable = [f for f in local if not os.access(f, os.R_OK)]
            if unreadable:
                out.append(f"curation.sources.{i}: {unreadable[0]} is not readable")
        except InstaflowError as err:
            out.append(f"curation.sources.{i}: {_first_line(err)}")
        except Exception as err:  # noqa: BLE001 - object stores raise many error types
            out.append(f"curation.sources.{i}: cannot read {src.path} ({_first_line(err)})")
    return out


def _source_fs(path: str, storage: StorageConfig) -> object | None:
    """The filesystem curation reads an object-store source with: the store's own when it is on S3 too, else
    the default client with short timeouts (a preflight must not hang on an unreachable endpoint)."""
    if not path.startswith("s3://"):
        return None
    from instaflow_core.store.uri import Store

    store = Store(storage)
    if store.is_s3:
        return store.fs
    import s3fs

    return s3fs.S3FileSystem(
        config_kwargs={"connect_timeout": 3, "read_timeout": 5, "retries": {"max_attempts": 1}},
        skip_instance_cache=True,
    )


# --------------------------------------------------------------------------------------------- storage
def creatable_problem(path: Path, what: str) -> str | None:
    """Why the folder `path` could not be created (or written, when it exists); None when it could. Writes nothing."""
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{what}: cannot create {path} ({p} is a file)"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{what}: cannot create {path} ({p} is not writable)"
    return None


def storage_problems(storage: StorageConfig) -> list[str]:
    """A local root can be created; an S3 root answers with these keys and the bucket takes a write + delete."""
    from instaflow_core.store.uri import Store

    try:
        store = Store(storage)
        if store.is_local:
            problem = creatable_problem(Path(store.prefix), "storage.root")
            return [problem] if problem else []
        store.check()
        was_empty = not [x for x in store.ls(store.root) if x.rstrip("/") != store.root]
        probe = store.uri(f".instaflow-preflight-{uuid.uuid4().hex[:12]}")
        store.write_bytes(probe, b"instaflow preflight: safe to delete\n")
        store.delete(probe, recursive=False)
        if was_empty:
            _drop_folder_markers(store)
    except InstaflowError as err:
        return [f"storage: {_first_line(err)}"]
    return []


def _drop_folder_markers(store: object) -> None:
    """Servers with a real directory tree (SeaweedFS's filer) keep `prefix/` after the probe object is
    deleted: remove those empty levels again (a no-op on AWS S3), deepest first, while nothing is under them."""
    parts = [p for p in (store.prefix or "").split("/") if p]  # type: ignore[attr-defined]
    for depth in range(len(parts), 0, -1):
        key = "/".join(parts[:depth])
        uri = f"s3://{store.bucket}/{key}"  # type: ignore[attr-defined]
        if [x for x in store.ls(uri) if x.rstrip("/") != uri]:  # type: ignore[attr-defined]
            return
        try:
            store.fs.call_s3("delete_object", Bucket=store.bucket, Key=key + "/")  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - best effort: an empty prefix is harmless
            return


def model_name_problem(name: str, what: str) -> str | None:
    """MLflow's rule for registered-model names (mlflow.utils.validation._validate_model_name): not blank, no
    '/' or ':' (they split `models:/<name>/<version>` URIs), not '.', '..' or '..x' (names become paths)."""
    if not name or not name.strip():
        return f"{what} is empty"
    bad = sorted({c for c in name if c in "/:"})
    if bad:
        return f"{what}={name!r}: MLflow model names cannot contain {' or '.join(repr(c) for c in bad)}"
    if name == "." or name.startswith(".."):
        return f"{what}={name!r}: MLflow model names cannot be '.' or start with '..'"
    return None


def registry_problems(reg: RegistrationConfig) -> list[str]:
    """The registered model names (and the experiment name) MLflow will accept."""
    out = [
        p
        for what, name in (
            ("registration.model_name", reg.model_name),
            ("registration.rf_model_name", reg.rf_model_name),
        )
        if name is not None and (p := model_name_problem(name, what))
    ]
    if reg.rf_model_name is not None and reg.rf_model_name == reg.model_name:
        out.append(f"registration.rf_model_name={reg.rf_model_name!r} is the same as registration.model_name")
    if not reg.experiment.strip():
        out.append("registration.experiment is empty")
    return out
