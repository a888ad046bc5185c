"""The curation stage: captions in, a versioned `prompts` LanceDB table out (`Curation`).

Crash safety: nothing is written to `prompts` until every source has been read and curated. Kept rows are
buffered in memory up to `curation.batch_rows`; beyond that they spill to a staging table (`_staging_prompts`,
overwritten at the start of each run, dropped at the end), so memory stays bounded for laion-size inputs.
Then ONE `merge_insert` on prompt_id commits the result: a crash before it leaves the previous version intact
(a failed run drops the staging table; only a killed process leaves it, for the next run to overwrite), and
Lance commits are atomic. Before the table is touched at all, `check_report` refuses a curation that kept
nothing or whose bad input rows exceed `curation.max_bad_fraction` (binary files are refused by the readers):
garbage never replaces good prompts.

The merge syncs the table to this curation: new prompts inserted, changed ones (split, token count, ...)
updated, prompts this configuration no longer keeps deleted; unchanged rows are not rewritten. A rerun thus
adds no duplicates, and every earlier state stays readable as an older table version. The lineage metadata
(config hash, sources, counts) is written right after, as the next version; the returned TableRef points at
that one.

The stage's protocol, in order: `source_files` (what the cache key watches: each input's size and mtime/etag),
`curate_images` (an image source's (image, caption) table), `curate_prompts` (read, curate, commit, index,
metadata), `curation_summary` (what a version recorded). The Prefect tasks (tasks/curation.py) are one call
each plus caching, retries and the report artifact.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from instaflow_core.config import PRETRAINED_TEACHER, CurationConfig, ModelsConfig, StorageConfig, stable_hash
from instaflow_core.curation.filters import token_counter
from instaflow_core.curation.images import IMAGES_META_KEY, is_image_source, write_image_table
from instaflow_core.curation.prompts import PROMPTS_SCHEMA, CurationReport, Curator, TokenCounter
from instaflow_core.curation.readers import curated_batches, source_identity
from instaflow_core.errors import DataError
from instaflow_core.refs import Stage, TableRef
from instaflow_core.store import (
    Store,
    create_table,
    get_metadata,
    open_ref,
    open_table,
    set_metadata,
    table_ref,
)
from instaflow_core.store.query import ensure_indexes

logger = logging.getLogger("instaflow.curation")

PROMPTS_TABLE = "prompts"
STAGING_TABLE = "_staging_prompts"
REPORT_KEY = "instaflow-curate-report"


def teacher_tokenizer(models: ModelsConfig) -> tuple[Any, str]:
    """The teacher's tokenizer and a short name for it, loading as little as possible.

    tiny: the committed CLIP BPE files; a diffusers folder: its tokenizer/ only; anything else: the full
    teacher (a single-file checkpoint). A hub id reads its configs and tokenizer files from the cache only.
    """
    if models.teacher == "tiny":
        from instaflow_core.models.tokenizer import tiny_tokenizer  # no transformers import for the tiny one

        return tiny_tokenizer(models.tiny.vocab_merges), f"tiny-clip-{models.tiny.vocab_merges}"
    if models.teacher == PRETRAINED_TEACHER:  # the digits model's text encoder reads the full tiny vocab
        from instaflow_core.models.tokenizer import TINY_CLIP_MERGES, tiny_tokenizer

        return tiny_tokenizer(), f"tiny-clip-{TINY_CLIP_MERGES}"
    from instaflow_core.models.sources import hub_snapshot, is_hub_id

    folder = Path(models.teacher.removeprefix("file://")).expanduser()
    if is_hub_id(
        models.teacher
    ):  # configs and tokenizer files only: never a teacher's weights for a tokenizer
        folder = hub_snapshot(
            models.teacher, revision=models.teacher_revision, local_files_only=models.local_files_only,
            configs_only=True,
        )  # fmt: skip
    if (folder / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"), f"{models.teacher}/tokenizer"
    from instaflow_core.models.loading import teacher_parts

    return teacher_parts(models)["tokenizer"], models.teacher


def curate_into_table(
    curation: CurationConfig,
    store: Store,
    count_tokens: TokenCounter,
    *,
    table_name: str = PROMPTS_TABLE,
    metadata: dict[str, Any] | None = None,
    code_version: str = "",
) -> tuple[TableRef, CurationReport]:
    """Read, curate and commit (see the module docstring); returns the table reference and the report."""
    config_hash = stable_hash(curation.model_dump(mode="json"))
    curator = Curator.from_config(curation, count_tokens)
    source_fs = store.fs if store.is_s3 else None  # s3:// sources use the store's endpoint and keys
    db = store.db()

    buffer: list[Any] = []
    buffered = 0
    staging = None
    try:
        for batch in curated_batches(curation, curator, fs=source_fs):
            buffer.append(batch)
            buffered += batch.num_rows
            if buffered >= curation.batch_rows:
                staging = staging or _fresh_staging(store, db)
                staging.add(_concat(buffer))
                buffer, buffered = [], 0
        report = curator.report
        check_report(report, curation, table_name)  # nothing has touched the table yet
        table = create_table(store, table_name, PROMPTS_SCHEMA)
        if staging is not None:
            if buffer:
                staging.add(_concat(buffer))
            source = staging.to_lance().scanner(batch_size=8192).to_reader()
        else:
            source = _concat(buffer)
        with store.guard(f"commit table {table_name!r}"):
            merge = (
                table.merge_insert("prompt_id")
                .when_matched_update_all(
                    # Lance's SQL has no IS DISTINCT FROM; these columns are never null in rows we write.
                    where="target.source != source.source OR target.split != source.split "
                    "OR target.n_tokens != source.n_tokens OR target.flags != source.flags"
                )
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete()
                .execute(source)
            )
    finally:  # committed or failed: the staging rows are not needed any more
        if staging is not None:
            _drop_staging(store, db)
    table = open_table(store, table_name)
    with store.guard(f"index table {table_name!r}"):
        ensure_indexes(table)  # the BTree id and full-text indexes read commands use (reads never build them)
    set_metadata(
        table,
        {
            "stage": str(Stage.CURATE),
            "config_hash": config_hash,
            "sources": json.dumps([s.model_dump(mode="json") for s in curation.sources]),
            "report": json.dumps(report.to_dict(), sort_keys=True),
            "code_version": code_version,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(metadata or {}),
        },
    )
    logger.info(
        "curated %d of %d captions into %s (inserted %s, updated %s, deleted %s)",
        report.kept,
        report.read,
        table_name,
        getattr(merge, "num_inserted_rows", "?"),
        getattr(merge, "num_updated_rows", "?"),
        getattr(merge, "num_deleted_rows", "?"),
    )
    return table_ref(store, table_name, config_hash=config_hash), report


def _concat(tables: list[Any]) -> Any:
    import pyarrow as pa

    return pa.concat_tables(tables) if tables else PROMPTS_SCHEMA.empty_table()


def _fresh_staging(store: Store, db: Any) -> Any:
    with store.guard("create the staging table"):
        return db.create_table(STAGING_TABLE, schema=PROMPTS_SCHEMA, mode="overwrite")


def _drop_staging(store: Store, db: Any) -> None:
    try:
        with store.guard("drop the staging table"):
            db.drop_table(STAGING_TABLE, ignore_missing=True)
    except Exception as err:  # noqa: BLE001 - never hide the real failure; the next run overwrites it
        logger.warning("could not drop %s: %s", STAGING_TABLE, err)


class CurationRefused(DataError):
    """The sources gave nothing worth committing; `report` holds the counts (published before raising)."""

    def __init__(self, message: str, report: CurationReport) -> None:
        super().__init__(message)
        self.report = report


def check_report(report: CurationReport, curation: CurationConfig, table_name: str = PROMPTS_TABLE) -> None:
    """Refuse (CurationRefused) a curation that kept nothing or read too many bad rows: the table stays."""
    unchanged = f"the {table_name} table was not changed"
    if report.read + sum(report.bad_rows.values()) == 0:
        raise CurationRefused(f"the caption sources hold no rows (empty files?); {unchanged}", report)
    frac = report.bad_fraction()
    if frac > curation.max_bad_fraction:
        bad = sum(report.bad_rows.values())
        raise CurationRefused(
            f"refused: {bad:,} of {report.read + bad:,} rows read ({frac:.1%}) are bad, more than "
            f"curation.max_bad_fraction={curation.max_bad_fraction:g} ({report.summary()}); {unchanged}",
            report,
        )
    if report.kept == 0:
        # Committing would empty the table: almost surely a wrong column, filter or source.
        raise CurationRefused(f"curation kept no captions ({report.summary()}); {unchanged}", report)


def source_files(curation: CurationConfig, storage: StorageConfig) -> list[dict[str, Any]]:
    """Path, size and mtime/etag of every file the sources name (cheap: listing only, no reads)."""
    if not curation.sources:
        raise DataError("curation.sources is empty: name at least one caption file (path, format, column)")
    store = Store(storage)
    fs = store.fs if store.is_s3 else None
    return [f for s in curation.sources for f in source_identity(s, fs)]


def curation_summary(storage: StorageConfig, ref: TableRef) -> dict[str, Any]:
    """The report and lineage recorded in the prompts table's metadata at the ref's version."""
    meta = get_metadata(open_ref(Store(storage), ref))
    return {
        "report": json.loads(meta.get("report", "{}")),
        "tokenizer": meta.get("tokenizer", "?"),
        "config_hash": meta.get("config_hash", ""),
    }


def curate_images(
    curation: CurationConfig, storage: StorageConfig, code_version: str = ""
) -> TableRef | None:
    """The (image, caption) table of the image source (`format: digits`), or None when there is none."""
    sources = [s for s in curation.sources if is_image_source(s)]
    if not sources:
        return None
    if len(sources) > 1:
        raise DataError("curation.sources: one image source (format digits) at most")
    meta = {"stage": str(Stage.CURATE), "config_hash": stable_hash(curation.images.model_dump(mode="json"))}
    ref = write_image_table(
        Store(storage), sources[0], curation.images, {**meta, "code_version": code_version}
    )
    logger.info("image table %s (%d rows)", ref.key(), ref.rows)
    return ref


def curate_prompts(
    curation: CurationConfig,
    models: ModelsConfig,
    storage: StorageConfig,
    source_files: list[dict[str, Any]],
    images: TableRef | None = None,
    code_version: str = "",
) -> tuple[TableRef, CurationReport]:
    """The configured caption sources into the `prompts` table, tokens counted with the teacher's tokenizer.

    `source_files` is recorded in the metadata (the task's cache key watches it); `images`: the image table the
    image sources wrote, recorded so later stages find the images of these prompts. CurationRefused (with the
    report) when the sources give nothing worth committing."""
    tokenizer, tokenizer_name = teacher_tokenizer(models)
    meta = {"tokenizer": tokenizer_name, "source_files": json.dumps(source_files, sort_keys=True)}
    if images is not None:
        meta[IMAGES_META_KEY] = images.model_dump_json()
    return curate_into_table(
        curation, Store(storage), token_counter(tokenizer), metadata=meta, code_version=code_version
    )
