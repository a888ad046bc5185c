"""Config sections of the digits problem: the (image, caption) table an image source becomes, the pixel-space
model teacher pretraining starts from, the digits evaluation's classifier and grid.

They live here, not in config.py, because config.py imports them (its `InstaflowConfig` holds them): this module
imports nothing from the project, only pydantic. `_Section` repeats `config.Section`'s rules for that reason.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PRETRAINED_TEACHER = (
    "pretrain"  # models.teacher: the pretrain stage trains the teacher (section `pretraining`)
)
# evaluation.fid_features / clip_model: the classifier that evaluation/digits.py trains on the real digits
DIGITS_NET = "digits-classifier"

DIGIT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}, written by hand",
    "a picture of the digit {word}",
    "{word}",
    "a scan of a handwritten {digit}",
    "an 8x8 image of the number {word}",
    "digit {digit}",
    "a small grey {word} drawn by someone",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ImageSetConfig(_Section):
    """`curation.images`: the (image, caption) table an image source (`format: digits`) becomes. A fixed
    stratified train/holdout split of the images (`split_seed`, independent of every experiment seed); each
    image captioned by `captions_per_image` of the templates ({word}: the class name, {digit}: the numeral)."""

    table: str = "images"
    holdout_fraction: float = Field(0.4, gt=0.0, lt=1.0)
    split_seed: int = 0
    captions_per_image: int | None = Field(None, ge=1)  # None = every template
    templates: list[str] = Field(default_factory=lambda: list(DIGIT_TEMPLATES), min_length=1)


class DigitsModelConfig(_Section):
    """`models.digits`: the pixel-space velocity net and frozen text encoder of models/digits.py."""

    seed: int = 0  # the velocity net's initial weights
    sample_size: int = 8
    hidden_size: int = Field(256, ge=1)
    num_blocks: int = Field(3, ge=1)
    mlp_ratio: float = Field(1.0, gt=0)
    cond_dim: int = Field(128, ge=1)
    time_frequencies: int = Field(8, ge=1)
    text_pooling: Literal["mean", "attention"] = "mean"
    text_norm: Literal["batch", "layer"] = "batch"
    text_hidden_size: int = Field(64, ge=1)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    text_seed: int = 0  # the frozen random text encoder (the same for every experiment seed)


class DigitsEvalConfig(_Section):
    """`evaluation.digits`: the classifier behind `digits-classifier` metrics, and the labelled grid."""

    classifier_steps: int = Field(600, ge=1)  # AdamW steps at batch 256 on the real train images
    classifier_seed: int = 0
    min_accuracy: float = Field(0.95, ge=0.0, le=1.0)  # below this on the holdout images: refuse to report
    # the labelled grid: one column per prompt (e.g. one per digit), one row per model at its key setting
    grid_prompts: list[str] = Field(default_factory=list)
    grid_labels: list[str] | None = None  # column labels (default: the prompts)


def check_pretraining(cfg: Any) -> None:
    """`InstaflowConfig` rules of a pretrained teacher (raise ValueError: pydantic reports it as config)."""
    if cfg.models.teacher != PRETRAINED_TEACHER:
        return
    if cfg.pretraining is None:
        raise ValueError("models.teacher=pretrain needs a `pretraining` section (a training schedule)")
    if cfg.generation.scheduler != "euler":
        raise ValueError(
            "models.teacher=pretrain is a rectified flow, solved by Euler steps: set generation.scheduler=euler"
        )
