"""The digits experiment's own config section (`digits:` in a preset): the pixel-space model that teacher
pretraining starts from, and the classifier behind the digits metrics. Registered in the vocabulary's
`config.EXPERIMENT_SECTIONS`; the image table's settings are the generic `curation.images`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from instaflow_core.config import Section

# evaluation.fid_features / clip_model: the classifier that experiments/digits/classifier.py trains on the digits
DIGITS_NET = "digits-classifier"


class DigitsModelConfig(Section):
    """`digits.model`: the pixel-space velocity net and frozen text encoder of experiments/digits/model.py."""

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


class DigitsClassifierConfig(Section):
    """`digits.classifier`: the classifier behind the `digits-classifier` metrics (FD and prompt alignment)."""

    steps: int = Field(600, ge=1)  # AdamW steps at batch 256 on the real train images
    seed: int = 0
    min_accuracy: float = Field(0.95, ge=0.0, le=1.0)  # below this on the holdout images: refuse to report


class DigitsConfig(Section):
    model: DigitsModelConfig = Field(default_factory=DigitsModelConfig)
    classifier: DigitsClassifierConfig = Field(default_factory=DigitsClassifierConfig)
