"""The teacher task: `models.teacher` as a ModelRef (`instaflow_core.models.teacher.resolve_teacher`), cached on
the models section, with its lineage artifact."""

from __future__ import annotations

from prefect import task

from instaflow_core.config import ModelsConfig, StorageConfig
from instaflow_core.models.teacher import resolve_teacher
from instaflow_core.refs import ModelRef, Stage
from tasks.artifacts import lineage_markdown, publish_markdown
from tasks.caching import stage_cache_key
from tasks.retries import STORE_RETRIES


@task(cache_key_fn=stage_cache_key, persist_result=True, name="teacher-resolve", **STORE_RETRIES)
def teacher_model(models_cfg: ModelsConfig, storage_cfg: StorageConfig) -> ModelRef:
    """The teacher as a ModelRef: `tiny` built and saved in the store, a single checkpoint file converted once,
    a folder / s3:// folder / hub id referenced where it is."""
    ref = resolve_teacher(models_cfg, storage_cfg)
    publish_markdown(
        f"instaflow-{Stage.TEACHER}",
        lineage_markdown(Stage.TEACHER, {"models.teacher": models_cfg.teacher}, {"teacher": ref}),
        description="The teacher model reference",
    )
    return ref
