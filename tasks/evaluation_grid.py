"""The evaluation's labelled comparison grid: one row per model at its key setting, one column per grid prompt.

For a pretrained (1-RF) teacher the rows are the paper's story: the teacher at its most steps, the teacher at
one step, the 2-RF at one step, InstaFlow at one step; every row from the same noise seeds, so a column shows
what each model makes of the same X0. Other teachers: the teacher's reference path, then the 2-RF and InstaFlow
at one step. `evaluation.digits.grid_prompts` empty: no grid.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import task

from instaflow_core.config import EvaluationConfig, ModelsConfig, StorageConfig, stable_hash
from instaflow_core.evaluation.eval_set import derived_seed
from instaflow_core.evaluation.paper_table import labelled_grid
from instaflow_core.evaluation.sampling import SamplerSpec, generate_images
from instaflow_core.inference.images import png_bytes
from instaflow_core.models.loading import load_model
from instaflow_core.refs import ModelKind, ModelRef
from instaflow_core.store import Store
from tasks.caching import code_version, stage_cache_key
from tasks.evaluation import teacher_spec

logger = logging.getLogger("instaflow.tasks.evaluation")


def grid_rows(
    eval_cfg: EvaluationConfig, teacher: ModelRef, models: dict[str, ModelRef]
) -> list[tuple[str, ModelRef, SamplerSpec]]:
    """(row label, model, sampler setting) of every grid row, in order."""
    out: list[tuple[str, ModelRef, SamplerSpec]] = []
    if teacher.kind == ModelKind.RF1:
        n = max(eval_cfg.rf_steps)
        out.append(
            (
                f"teacher {n}-step",
                teacher,
                SamplerSpec(f"1rf_{n}step", ModelKind.RF1, "euler", n, eval_cfg.rf_guidance),
            )
        )
        out.append(
            (
                "1-RF 1-step",
                teacher,
                SamplerSpec("1rf_1step", ModelKind.RF1, "euler", 1, eval_cfg.rf_guidance),
            )
        )
    else:
        spec = teacher_spec(eval_cfg)
        out.append((f"teacher {spec.steps}-step", teacher, spec))
    if models.get(ModelKind.RF2) is not None:
        out.append(
            (
                "2-RF 1-step",
                models[ModelKind.RF2],
                SamplerSpec("2rf_1step", ModelKind.RF2, "euler", 1, eval_cfg.rf_guidance),
            )
        )
    if models.get(ModelKind.INSTAFLOW) is not None:
        out.append(
            (
                "InstaFlow 1-step",
                models[ModelKind.INSTAFLOW],
                SamplerSpec("instaflow_1step", ModelKind.INSTAFLOW, "euler", 1, 1.0),
            )
        )
    return out


@task(cache_key_fn=stage_cache_key, persist_result=True, name="evaluate-grid")
def comparison_grid(
    eval_cfg: EvaluationConfig,
    models_cfg: ModelsConfig,
    storage_cfg: StorageConfig,
    teacher: ModelRef,
    models: dict[str, ModelRef],
) -> dict[str, Any] | None:
    """The labelled grid PNG in the store (eval/grids/<key>.png): {uri, rows, columns}, or None without prompts."""
    prompts = list(eval_cfg.digits.grid_prompts)
    if not prompts:
        return None
    labels = list(eval_cfg.digits.grid_labels or prompts)
    seeds = [derived_seed("grid", eval_cfg.seed, i) for i in range(len(prompts))]
    rows = grid_rows(eval_cfg, teacher, models)
    images = []
    for _, ref, spec in rows:
        images.append(
            generate_images(
                load_model(ref, storage_cfg, models_cfg), spec, prompts, seeds, batch_size=len(prompts)
            )
        )
    grid = labelled_grid(images, [label for label, _, _ in rows], labels)
    store = Store(storage_cfg)
    key = stable_hash(
        {
            "rows": [(label, ref.key(), spec.__dict__) for label, ref, spec in rows],
            "prompts": prompts,
            "seeds": seeds,
            "code": code_version(),
        }
    )
    uri = store.uri("eval", "grids", f"{key}.png")
    store.write_bytes(uri, png_bytes(grid))
    logger.info("labelled grid %s: rows %s", uri, [label for label, _, _ in rows])
    return {"uri": uri, "rows": [label for label, _, _ in rows], "columns": labels}
