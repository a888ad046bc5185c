"""Prompt curation as Prefect tasks: one call each into `instaflow_core.curation.stage`, plus the cache key
(the curation section, the teacher and the source files' identities), retries and the report artifact."""

from __future__ import annotations

from typing import Any

from prefect import task

from instaflow_core.config import CurationConfig, ModelsConfig, StorageConfig
from instaflow_core.curation import stage
from instaflow_core.curation.stage import CurationRefused
from instaflow_core.refs import TableRef
from tasks.artifacts import publish_table
from tasks.caching import code_version, stage_cache_key
from tasks.retries import STORE_RETRIES

REPORT_KEY = "instaflow-curate-report"


@task(name="curate-prompts", cache_key_fn=stage_cache_key, persist_result=True, **STORE_RETRIES)
def curate_prompts(
    curation: CurationConfig,
    models: ModelsConfig,
    storage: StorageConfig,
    source_files: list[dict[str, Any]],
    images: TableRef | None = None,
) -> TableRef:
    """Curate the configured caption sources into the `prompts` table; publish counts dropped per reason.

    `source_files` (path, size, mtime/etag of every input file) is part of the cache key only: a changed or
    added file recomputes, an unchanged one is a cache hit."""
    try:
        ref, report = stage.curate_prompts(curation, models, storage, source_files, images, code_version())
    except CurationRefused as err:
        publish_table(REPORT_KEY, err.report.rows(), description=f"REFUSED: {err}")
        raise
    publish_table(
        REPORT_KEY,
        report.rows(),
        description=f"Captions dropped per reason; kept {report.kept} of {report.read} into {ref.key()}",
    )
    return ref


@task(name="curate-images", cache_key_fn=stage_cache_key, persist_result=True)
def curate_images(
    curation: CurationConfig, storage: StorageConfig, source_files: list[dict[str, Any]]
) -> TableRef | None:
    """The (image, caption) table of the image source (`format: digits`), or None when there is none."""
    return stage.curate_images(curation, storage, code_version())
