"""Stage 1: curate caption sources into the versioned `prompts` table."""

from __future__ import annotations

from prefect import flow, get_run_logger

from instaflow_core.config import InstaflowConfig
from instaflow_core.curation.prompts import CurationReport
from instaflow_core.curation.stage import curation_summary, source_files
from instaflow_core.refs import Stage, TableRef
from tasks.artifacts import lineage_markdown, publish_markdown
from tasks.curation import curate_images, curate_prompts


@flow(name="instaflow-curate")
def curate_flow(cfg: InstaflowConfig) -> TableRef:
    """Captions (Parquet / JSONL / CSV / text / COCO, local or in the store) -> prompts table reference.

    Reads `curation`, `models` (the teacher's tokenizer counts tokens) and `storage`. The task is cached on
    the curation section, the teacher and the source files' identities, so it reruns only when one changes.
    """
    files = source_files(cfg.curation, cfg.storage)
    images = curate_images(cfg.curation, cfg.storage, files)  # image sources only (format digits), else None
    ref = curate_prompts(cfg.curation, cfg.models, cfg.storage, files, images)
    summary = curation_summary(cfg.storage, ref)
    report = summary["report"]
    dropped = {
        **report.get("dropped", {}),
        **{f"bad row: {k}": v for k, v in report.get("bad_rows", {}).items()},
    }
    extra = "\n".join(
        [
            f"kept **{report.get('kept', '?')}** of {report.get('read', '?')} captions "
            f"(splits {report.get('splits', {})}); tokens counted with `{summary['tokenizer']}`",
            "",
            "dropped: " + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"),
        ]
    )
    inputs = {f"source {i}": f["path"] for i, f in enumerate(files)}
    inputs["curation config"] = ref.config_hash
    if images is not None:
        extra += f"\n\nimage table `{images.key()}` ({images.rows} (image, caption) rows)"
    publish_markdown(
        "instaflow-curate",
        lineage_markdown(Stage.CURATE, inputs, {"prompts": ref}, extra),
        description="Prompt curation lineage",
    )
    get_run_logger().info(
        "prompts table %s (%d rows); curation: %s",
        ref.key(),
        ref.rows,
        CurationReport.from_dict(report).summary(),
    )
    return ref
