"""`instaflow pretrain`: the teacher-pretraining stage on its own, on the latest curated prompts.

It trains the 1-Rectified Flow teacher (`models.teacher: pretrain`) on the image table those prompts were
curated from and records it as the latest `teacher`, so `instaflow generate` / `reflow` / `evaluate` use it.
"""

from __future__ import annotations

from flows.cli.options import PresetOpt, SetOpt
from flows.cli.run import PrefectApiOpt, _inputs, _prepare, _remember, _run, console
from instaflow_core.config import PRETRAINED_TEACHER
from instaflow_core.errors import ConfigError
from instaflow_core.refs import RefName, Stage


def pretrain(
    preset: str = PresetOpt, set_: list[str] = SetOpt, prefect_api: str | None = PrefectApiOpt
) -> None:
    """Stage 1b: train the teacher (a 1-rectified flow) on the curated (image, caption) table."""
    cfg = _prepare(preset, set_, prefect_api, stages=[Stage.PRETRAIN])
    from flows.pretrain import pretrain_flow

    if not Stage.PRETRAIN.runs(cfg):
        raise ConfigError(
            f"models.teacher is {cfg.models.teacher!r}: pretraining runs when it is `{PRETRAINED_TEACHER}` (e.g. --preset digits)"
        )
    ref = _run(pretrain_flow, cfg, _inputs(cfg, Stage.PRETRAIN)[RefName.PROMPTS])
    _remember(cfg, **{RefName.TEACHER: ref})
    console.print(f"1-RF teacher: {ref.uri}")
