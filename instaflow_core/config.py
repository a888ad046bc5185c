"""Typed configuration for every stage: YAML presets validated by pydantic, `a.b=c` overrides, stable hashes.

A section's hash is the cache key material of the stage that reads it: it covers the section's values only,
so changing `distill.*` leaves the hashes of `curation`, `generation` and `reflow` untouched.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from instaflow_core.errors import ConfigError
from instaflow_core.overrides import apply_override, format_validation, parse_override
from instaflow_core.refs import PRETRAINED_TEACHER

PRESETS_DIR = Path(__file__).resolve().parent / "presets"  # package data: found by wheel installs too
# Sections that were renamed (one word per stage): a preset or override using the old name gets told the new one.
RENAMED_SECTIONS = {"eval": "evaluation", "registry": "registration", "distill": "distillation"}
# Keys that moved into an experiment's own section: old path -> new path (one line tells the user).
MOVED_KEYS = {
    "models.digits": "digits.model",
    "evaluation.digits": "digits.classifier (grid_prompts / grid_labels: evaluation.grid_prompts / grid_labels)",
}
# Experiments' own sections: the section name -> "module:Class". The vocabulary names where a known-answer
# experiment keeps its settings and imports that module only when a config has the section, so config.py
# depends on no experiment (the experiment imports `Section` from here).
EXPERIMENT_SECTIONS = {"digits": "instaflow_core.experiments.digits.config:DigitsConfig"}


def _no_is_no(value: Any) -> Any:
    """YAML 1.1 reads `no` as false: `--set reflow.mixed_precision=no` means accelerate's "no", not a bool."""
    return "no" if value is False else value


# accelerate's words; `no` = full precision
MixedPrecision = Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(_no_is_no)]
Switch = bool | Literal["auto"]  # a speed switch: "auto" = on CUDA only (docs/gpu-speed.md lists them all)


class Section(BaseModel):
    """Base for all config sections: unknown keys are rejected, values validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------- storage
class StorageConfig(Section):
    """Where everything lives. `root` is a plain path, file:// or s3:// URI.

    S3 credentials are never part of the config file: they are read from the environment variables named
    here (so the resolved config can be saved with a run without leaking secrets).
    """

    root: str = "file://./.instaflow"
    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:8333 ; None = AWS
    s3_region: str = "us-east-1"
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    allow_http: bool | None = None  # None = derive from the endpoint's scheme

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        from instaflow_core.store.endpoints import check_endpoint  # here: store imports this module

        return check_endpoint(v)


# ----------------------------------------------------------------------------------------- orchestration
class OrchestrationConfig(Section):
    # thread | process: one machine; ray: a Ray cluster, a Ray task per shard (tasks/runners.py, infra/SCALE_OUT.md)
    task_runner: Literal["thread", "process", "ray"] = "thread"
    max_workers: int = Field(2, ge=1)  # threads / processes; the CPUs of a local Ray instance
    ray_address: str | None = None  # None: a local Ray instance; "auto"; "host:6379"; "ray://host:10001"
    ray_task_cpus: float = Field(1.0, gt=0)  # CPUs per shard / evaluation task
    ray_task_gpus: float | None = Field(None, ge=0)  # None: 1 per task when the cluster has GPUs, else 0
    ray_max_retries: int = Field(3, ge=1)  # re-runs of a task whose worker process died
    lease_ttl_s: float = Field(60.0, ge=2)  # a shard lease without heartbeat this long is free (S3)
    rows_per_commit: int | None = Field(None, ge=1)  # None: a commit per batch; more: fewer commits
    # Where Prefect persists task results (needed for cross-run caching). None = <storage.root>/prefect-results
    result_storage: str | None = None
    torch_threads: int | None = Field(None, ge=1)  # torch intra-op threads (1 for small models on busy CPUs)
    # store/registry tasks retry transient failures this long after the first one (tasks/retries.py); 0 = never
    retry_window_s: float = Field(300.0, ge=0)


# ------------------------------------------------------------------------------------------------ models
class TinyModelConfig(Section):
    """SD-architecture models small enough for a CPU, built from config with a fixed seed (no download)."""

    seed: int = 0
    sample_size: int = 8  # latent side; image side = sample_size * 2 ** (len(vae_channels) - 1)
    unet_channels: list[int] = Field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    vae_channels: list[int] = Field(default_factory=lambda: [32, 64])
    text_hidden_size: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 37
    vocab_merges: int = 4000  # how many CLIP BPE merges the tiny tokenizer keeps


class ModelsConfig(Section):
    """The teacher: `tiny` (built from `tiny`), a local diffusers folder, a single .safetensors file, a hub id, or
    `pretrain`: a 1-rectified flow (architecture `digits`) the pretrain stage trains on the curated images."""

    teacher: str = "tiny"
    teacher_revision: str | None = None
    allow_pickle: bool = False  # .ckpt/.bin checkpoints run arbitrary code when loaded: opt in explicitly
    local_files_only: bool = True  # never reach for a hub unless the user says so
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # saved 2-RF / InstaFlow folders hold the full-precision safetensors only; true adds *.fp16.safetensors
    save_variants: bool = False
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


# -------------------------------------------------------------------------------------------- curation
class CaptionSource(Section):
    path: str  # local path or store URI
    # a caption file format, or an image source (curation/images.py: IMAGE_SOURCES, e.g. digits: scikit-learn's)
    format: Literal["auto", "parquet", "jsonl", "csv", "txt", "coco", "digits"] = "auto"
    column: str = "TEXT"  # caption column for parquet/jsonl/csv


class ImageSetConfig(Section):
    """`curation.images`: the (image, caption) table an image source becomes (curation/images.py). A fixed
    stratified train/holdout split of the images (`split_seed`, independent of every experiment seed); each
    image captioned by `captions_per_image` of the templates (fields the source fills, e.g. digits' {word} and
    {digit}); no templates: the source's own."""

    table: str = "images"
    holdout_fraction: float = Field(0.4, gt=0.0, lt=1.0)
    split_seed: int = 0
    captions_per_image: int | None = Field(None, ge=1)  # None = every template
    templates: list[str] = Field(default_factory=list)


class CurationConfig(Section):
    sources: list[CaptionSource] = Field(default_factory=list)
    batch_rows: int = Field(50_000, ge=1)  # streaming batch size: memory does not grow with the file
    min_chars: int = Field(3, ge=0)
    min_tokens: int = Field(3, ge=0)
    max_tokens: int = Field(77, ge=1)  # CLIP's context, counted with the teacher's tokenizer
    near_dedupe: bool = True
    blocklist: list[str] = Field(default_factory=list)
    language: str | None = None  # e.g. "en": keep captions that look like this language
    holdout_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    on_bad_row: Literal["skip", "error"] = "skip"
    # refuse a curation whose bad rows exceed this share of the rows read (binary files: always refused)
    max_bad_fraction: float = Field(0.2, ge=0.0, le=1.0)
    max_prompts: int | None = Field(None, ge=1)
    images: ImageSetConfig = Field(default_factory=ImageSetConfig)  # image sources (format digits)


# ------------------------------------------------------------------------------------------ generation
class PairsConfig(Section):
    """How a model turns (prompt, seed) into (X0, X1) pairs, sharded: the teacher's triplets (`generation`) and
    the 2-RF's distillation pairs (`distillation.pairs`) share these settings and the machinery behind them."""

    images_per_prompt: int = Field(1, ge=1)
    seed: int = 0  # base seed: per-pair seeds derive from (seed, prompt_id, image index)
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(5.0, ge=0.0)
    shard_size: int = Field(256, ge=1)  # prompts per shard (one Prefect task run per shard)
    batch_size: int = Field(8, ge=1)  # prompts per model forward
    max_prompts: int | None = Field(None, ge=1)
    # image side in px (latents = resolution / VAE factor); None = the model's native size (512 for SD 1.5)
    resolution: int | None = Field(None, ge=8)
    # the text conditions of the prompts, computed once into the store for training (generation/conditions.py);
    # float16 halves their bytes (T5-sized conditions: MBs per prompt)
    conditions_dtype: Literal["float32", "float16"] = "float32"


class GenerationConfig(PairsConfig):
    """The teacher's triplets: its probability-flow ODE through a diffusers scheduler, with CFG."""

    # the teacher's sampler, a name its model family knows (SD: dpmsolver++ | euler | ddim; the family's module
    # lists its own: `ModelFamily.schedulers`); checked against the teacher when it loads and by the preflight
    scheduler: str = "dpmsolver++"
    negative_prompt: str = ""
    store_noise: bool = False  # the seed reproduces X0; store it only when asked
    split: Literal["train", "holdout", "all"] = "train"
    mixed_precision: MixedPrecision = "no"
    compile: Switch = "auto"  # speed switches (docs/gpu-speed.md): torch.compile of the teacher UNet
    channels_last: Switch = "auto"
    cfg_batched: bool = True  # false: uncond and cond as two forwards (half the activation memory)
    async_write: Switch = "auto"  # batch k's table write runs while batch k+1 is solved


# -------------------------------------------------------------------------------------------- training
class TrainStageConfig(Section):
    """One stage of a schedule (the paper trains reflow in two: batch 64, then 1024)."""

    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # per optimizer step, across processes and accumulation
    micro_batch_size: int | None = Field(None, ge=1)  # per forward; accumulation = batch / (micro * world)
    loss: Literal["l2", "pseudo_huber", "lpips"] = "l2"
    lr: float | None = Field(None, gt=0)  # None = the section's lr


class FSDPConfig(Section):
    """Fully sharded data parallel training (FSDP2 through accelerate) for students that do not fit one GPU.

    Parameters, gradients, optimizer state and the EMA are split across the processes; each wrapped unit (a
    transformer / UNet block) is gathered only while it runs. Needs `num_processes >= 2`. Checkpoints keep
    the unsharded layout (infra/ACCELERATE.md, "FSDP").
    """

    enabled: bool = False
    # the units gathered one at a time: "blocks" = modules of the classes below; "size" = any module with more than
    # min_num_params parameters; "none" = the whole model is one unit (shards the optimizer state and gradients)
    wrap: Literal["blocks", "size", "none"] = "blocks"
    # wrap=blocks: class names, e.g. ["FluxTransformerBlock", "FluxSingleTransformerBlock"]; [] = the model's own
    # `_no_split_modules` (diffusers' UNets and transformers name their blocks there)
    block_classes: list[str] = Field(default_factory=list)
    min_num_params: int = Field(50_000_000, ge=1)
    reshard_after_forward: bool = True  # false: blocks stay gathered from forward to backward (speed)
    cpu_offload: bool = False  # keep the shards (and the optimizer step) in CPU memory
    # dtype blocks are gathered and computed in; auto = the section's mixed_precision (bf16 -> bfloat16)
    param_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    reduce_dtype: Literal["float32", "param"] = "float32"  # gradient reduce-scatter: fp32, or param_dtype


class TrainConfig(Section):
    stages: list[TrainStageConfig]
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(1000, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.9999, ge=0.0, le=1.0)
    t_schedule: Literal["uniform", "logit_normal", "cosmap", "u_shaped"] = "uniform"  # rectified_flow
    huber_c: float = Field(0.001, gt=0)  # pseudo-Huber constant, scaled by sqrt(dim) in the loss
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # share of captions trained as "" (guidance)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int | None = Field(2, ge=1)  # newest N step folders kept in ckpt_dir; None = all
    log_every: int = Field(10, ge=1)
    seed: int = 0
    mixed_precision: MixedPrecision = "no"
    tf32: Switch = "auto"  # speed switches, set on the student's UNet (docs/gpu-speed.md)
    channels_last: Switch = "auto"
    gradient_checkpointing: bool = False
    sdpa: bool = True
    compile: Switch = False
    adamw: Literal["auto", "fused", "foreach", "for-loop"] = "auto"  # auto: fused on CUDA
    prefetch: Switch = "auto"  # the pinned, prefetching loader (batch sources must not use the global RNG)
    use_8bit_adam: bool = False
    # > 1: the training task runs `accelerate launch --num_processes N [launcher_args] -m instaflow_core.training.entry`
    # (infra/ACCELERATE.md); launcher_args e.g. ["--config_file", "fsdp.yaml"] or multi-node flags.
    num_processes: int = Field(1, ge=1)
    launcher_args: list[str] = Field(default_factory=list)
    # FSDP2 (sharded training) instead of DDP when num_processes > 1; left out of dumps and hashes while disabled
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    # GB (2^30 bytes) of GPU memory per process this section must fit: `instaflow check` estimates the student's
    # training memory from the teacher's configs (training/memory.py) and names a plan that does not fit; None =
    # no check. A check setting, not a training input: left out of the stage key (and of dumps while None)
    gpu_memory_gb: float | None = Field(None, gt=0)
    init_from: str | None = None  # a diffusers folder/URI or checkpoint; None = the previous stage's; scratch
    sample_prompts: list[str] = Field(default_factory=lambda: ["a photo of a cat", "a red car on a street"])
    sample_steps: int = Field(25, ge=1)
    sample_guidance: float = Field(1.5, ge=0.0)

    @field_validator("stages")
    @classmethod
    def _non_empty(cls, v: list[TrainStageConfig]) -> list[TrainStageConfig]:
        if not v:
            raise ValueError("at least one training stage is required")
        return v

    @model_validator(mode="after")
    def _fsdp_needs_processes(self) -> TrainConfig:
        if self.fsdp.enabled and self.num_processes < 2:
            raise ValueError("fsdp.enabled shards across processes: set num_processes >= 2")
        if self.fsdp.enabled and self.use_8bit_adam:
            raise ValueError("fsdp.enabled does not work with use_8bit_adam (its state is not sharded)")
        return self

    @model_serializer(mode="wrap")
    def _drop_default_fsdp(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A disabled, default `fsdp` and an unset `gpu_memory_gb` are left out, so configs without them dump and
        hash as before they existed (the stage keys of existing stores and their checkpoints stay valid)."""
        data = handler(self)
        if isinstance(data, dict) and self.fsdp == FSDPConfig():
            data.pop("fsdp", None)
        if isinstance(data, dict) and self.gpu_memory_gb is None:
            data.pop("gpu_memory_gb", None)
        return data


def _distillation_pairs() -> PairsConfig:
    """The 2-RF's own pairs: Euler with light guidance, and a base seed apart from generation's (fresh noise)."""
    return PairsConfig(guidance_scale=1.5, seed=1)


class DistillationConfig(TrainConfig):
    pairs: PairsConfig = Field(default_factory=_distillation_pairs)
    lpips_weights: str | None = None  # local path to LPIPS weights (stage loss "lpips")
    teacher_control: bool = False  # also distill the (rectified-flow) teacher alike: the paper's control


# -------------------------------------------------------------------------------------------- evaluation
TRAINING_SECTIONS = ("pretraining", "reflow", "distillation")  # the sections a curve can be drawn for
EveryN = Annotated[int, Field(ge=0)]


class DuringTrainingConfig(Section):
    """`evaluation.during_training`: a small fixed-prompt evaluation of the EMA weights while a stage trains
    (instaflow_core/evaluation/curves.py, docs/evaluation.md): FD / FID, CLIP score (prompt alignment on
    digits) and straightness (pretraining, reflow) every `every_steps` optimizer steps, logged as MLflow
    metric curves of the stage's run. Off by default; not part of any stage's key (it changes no weights)."""

    # optimizer steps between evaluations: one number for every training stage, or one per section
    # ({pretraining: 250, reflow: 100, distillation: 5}; a section left out is not evaluated); None / 0 = off
    every_steps: EveryN | dict[Literal["pretraining", "reflow", "distillation"], EveryN] | None = None
    samples: int = Field(100, ge=2)  # images per evaluation (fixed prompts and seeds)
    # the fixed prompts, cycled to `samples` with fixed seeds; [] = the first `samples` of the evaluation set
    prompts: list[str] = Field(default_factory=list)
    # the metric keep_best ranks by (and the curve the summary leads with): fid (lower is better) or clip_score
    metric: Literal["fid", "clip_score"] = "fid"
    keep_best: bool = False  # the EMA weights of the best point in `best/` beside the checkpoints
    # sampler steps; None = each stage's key setting: 1 for reflow and distillation, max(rf_steps) for pretraining
    steps: int | None = Field(None, ge=1)

    @field_validator("every_steps", mode="before")
    @classmethod
    def _sections(cls, v: Any) -> Any:
        if isinstance(v, dict):
            wrong = sorted(str(k) for k in v if k not in TRAINING_SECTIONS)
            if wrong:
                raise ValueError(
                    f"per-section steps are keyed by {', '.join(TRAINING_SECTIONS)} (not {', '.join(wrong)})"
                )
        return v

    def every(self, section: str) -> int:
        """Optimizer steps between evaluations of this training section (0 = off)."""
        if isinstance(self.every_steps, dict):
            return int(self.every_steps.get(section) or 0)
        return int(self.every_steps or 0)


class EvaluationConfig(Section):
    """How models are evaluated. `protocol` names the captions, sample count, image size, resize pipeline and CLIP
    caption prefix (instaflow_core/evaluation/protocols.py, docs/evaluation.md); `image_size`, `resize` and
    `caption_prefix` left at "protocol" take the protocol's values, anything else overrides them (and is recorded;
    a value off the paper's protocol loses the paper-comparable label)."""

    # auto: COCO captions + images -> coco2017-5k / coco2014-30k by the captions' year; otherwise `teacher` (the
    # teacher's own images on the same prompts and seeds), or `holdout-images` for prompts curated from images
    protocol: Literal[
        "auto", "coco2017-5k", "coco2014-30k", "teacher", "teacher-other-seeds", "holdout-images"
    ] = "auto"
    coco_captions: str | None = (
        None  # captions_val2017.json / captions_val2014.json (local path or store URI); None = holdout prompts
    )
    coco_images: str | None = None  # the matching image folder (val2017/ or val2014/), the reference images
    num_samples: int = Field(5000, ge=2)  # coco2017-5k: 5000, coco2014-30k: 30000
    # px of the first resize of real and generated images (centre crop, then this size); None = native (crop only);
    # "protocol" = the protocol's (coco2017-5k: native, coco2014-30k: 256, teacher: native)
    image_size: Annotated[int, Field(ge=8)] | Literal["protocol"] | None = "protocol"
    resize: Literal["protocol", "legacy-tf", "clean"] = (
        "protocol"  # legacy-tf: torch-fidelity's; clean: clean-fid's
    )
    caption_prefix: str = (
        "protocol"  # prepended to captions for the CLIP score text (coco2014-30k: "A photo depicts ")
    )
    resolution: int | None = Field(None, ge=8)  # px the models generate at; None = each model's native size
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    fid_features: str = "inception"  # inception | clip | dinov2 | tiny, or a local path to weights
    inception_weights: str | None = (
        None  # local path of pt_inception-2015-12-05-6726825d.pth (sha256 checked)
    )
    clip_model: str = "tiny"  # a local CLIP folder or hub id; "tiny" = random CLIP built from config
    teacher_steps: int = Field(25, ge=1)
    teacher_guidance: float = Field(5.0, ge=0.0)
    rf_steps: list[int] = Field(default_factory=lambda: [1, 25])
    rf_guidance: float = Field(1.5, ge=0.0)
    straightness_steps: int = Field(25, ge=2)
    latency_repeats: int = Field(5, ge=1)
    # the labelled comparison grid: one column per prompt (e.g. one per digit), one row per model at its key
    # setting (teacher at its steps, 1-RF / 2-RF / InstaFlow at one step); empty: no grid
    grid_prompts: list[str] = Field(default_factory=list)
    grid_labels: list[str] | None = None  # column labels (default: the prompts)
    # quality curves while the training stages run (off by default); left out of dumps and hashes while off
    during_training: DuringTrainingConfig = Field(default_factory=DuringTrainingConfig)

    @field_validator("image_size", mode="before")
    @classmethod
    def _native(cls, v: Any) -> Any:
        return None if isinstance(v, str) and v.strip().lower() in ("native", "none", "null") else v

    @model_serializer(mode="wrap")
    def _drop_default_curves(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A default (off) `during_training` is left out, so configs without it dump and hash as before it
        existed (the evaluation stage's cache keys of existing stores stay valid)."""
        data = handler(self)
        if isinstance(data, dict) and self.during_training == DuringTrainingConfig():
            data.pop("during_training", None)
        return data

    @model_validator(mode="after")
    def _protocol_data(self) -> EvaluationConfig:
        year = {"coco2017-5k": "2017", "coco2014-30k": "2014"}.get(self.protocol)
        if year and not (self.coco_captions and self.coco_images):
            raise ValueError(
                f"evaluation.protocol={self.protocol} needs evaluation.coco_captions (captions_val{year}.json) and "
                f"evaluation.coco_images (val{year}/)"
            )
        return self


# ---------------------------------------------------------------------------------------------- registry
class GateConfig(Section):
    max_fid_increase: float = Field(0.5, ge=0)  # candidate FID may exceed the champion's by at most this
    max_clip_decrease: float = Field(
        0.005, ge=0
    )  # candidate CLIP may fall below the champion's by at most this


class RegistrationConfig(Section):
    tracking_uri: str | None = None  # None = sqlite under the store's local root (or ./.instaflow/mlflow.db)
    experiment: str = "instaflow"
    model_name: str = "instaflow-tiny"
    rf_model_name: str | None = None  # also register the 2-RF under this name
    auto_promote: bool = True
    gate: GateConfig = Field(default_factory=GateConfig)

    @field_validator("model_name", "rf_model_name")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        from instaflow_core.registration.rules import check_model_name

        return check_model_name(v)


# ---------------------------------------------------------------------------------------------- the whole
class InstaflowConfig(Section):
    preset: str = "custom"
    storage: StorageConfig = Field(default_factory=StorageConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    pretraining: TrainConfig | None = None  # the pretrain stage (models.teacher=pretrain)
    reflow: TrainConfig
    distillation: DistillationConfig
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registration: RegistrationConfig = Field(default_factory=RegistrationConfig)
    # an experiment's own section (EXPERIMENT_SECTIONS): the digits pixel model and classifier
    digits: SerializeAsAny[Section] | None = None

    @field_validator("digits", mode="before")
    @classmethod
    def _experiment(cls, value: Any, info: Any) -> Any:
        if value is None or isinstance(value, Section):
            return value
        return experiment_section(info.field_name).model_validate(value)

    @model_validator(mode="after")
    def _check(self) -> InstaflowConfig:
        if self.generation.split == "holdout" and self.curation.holdout_fraction == 0:
            raise ValueError("generation.split=holdout needs curation.holdout_fraction > 0")
        if self.models.teacher == PRETRAINED_TEACHER:
            if self.pretraining is None:
                raise ValueError(
                    "models.teacher=pretrain needs a `pretraining` section (a training schedule)"
                )
            if self.generation.scheduler != "euler":
                raise ValueError(
                    "models.teacher=pretrain is a rectified flow, solved by Euler steps: set "
                    "generation.scheduler=euler"
                )
            if self.digits is None:
                raise ValueError(
                    "models.teacher=pretrain needs the architecture to pretrain: a `digits` section "
                    "(digits.model; see the digits preset)"
                )
        return self

    def section(self, path: str) -> Any:
        """A section or a nested part of one by dotted path (`reflow`, `digits.model`)."""
        value: Any = self
        for part in path.split("."):
            value = getattr(value, part, None) if value is not None else None
        return value

    def section_hash(self, section: str) -> str:
        """A stable 16-hex hash of one section's values, or of a nested part (`digits.model`): the cache key
        material of the stage that reads it."""
        value = self.section(section)
        return stable_hash(value.model_dump(mode="json") if value is not None else None)

    def hashes(self) -> dict[str, str]:
        return {name: self.section_hash(name) for name in type(self).model_fields if name != "preset"}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def stable_hash(obj: Any) -> str:
    """sha256 over canonical JSON (sorted keys, no whitespace): equal values give equal hashes anywhere."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- loading
def preset_path(preset: str | Path) -> Path:
    """A preset name (`tiny`, `sd15`) resolves to instaflow_core/presets/<name>.yaml; anything else is a path."""
    p = Path(preset)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = PRESETS_DIR / f"{preset}.yaml"
    if not candidate.is_file():
        known = sorted(x.stem for x in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {str(preset)!r}: choose one of {known} or give a .yaml path")
    return candidate


def experiment_section(name: str) -> type[Section]:
    """The section class an experiment registered under `name` (EXPERIMENT_SECTIONS), imported on first use."""
    module, cls = EXPERIMENT_SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def from_dict(data: dict[str, Any]) -> InstaflowConfig:
    for old, new in RENAMED_SECTIONS.items():
        if old in data:
            raise ConfigError(
                f"config section {old!r} is now called {new!r}: rename it in the preset / --set"
            )
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ConfigError(f"config key {old!r} is now {new}: move it in the preset / --set")
    try:
        return InstaflowConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation(err)) from err


def load(preset: str | Path = "tiny", overrides: list[str] | None = None) -> InstaflowConfig:
    """Load a preset (name or path), apply `section.key=value` overrides, validate."""
    path = preset_path(preset)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data.setdefault("preset", path.stem)
    for item in overrides or []:
        parts, value = parse_override(item)
        apply_override(data, parts, value)
    cfg = from_dict(data)
    _anchor_bundled_paths(cfg, path)
    return cfg


def _anchor_bundled_paths(cfg: InstaflowConfig, preset_file: Path) -> None:
    """A relative caption path that is not found from the cwd but lies next to the preset file (the tiny
    preset's bundled captions) is made absolute, so `instaflow rebuild --preset tiny` works from any directory
    and from a wheel install."""
    here = preset_file.resolve().parent
    for src in cfg.curation.sources:
        p = Path(src.path)
        if "://" in src.path or p.is_absolute() or p.exists():
            continue
        if (here / p).exists():
            src.path = str(here / p)
