"""Stage 2: the teacher turns (prompt, seed) into triplets (prompt, X0 seed, X1), sharded and exactly-once.

`pairs_flow` is the shard fan-out both pair-making stages compose (generation's triplets here, distillation's
pairs in flows/distill.py):

    prompts table version -> plan (sorted prompt ids, shards of N prompts) -> prepare the table (schema, lineage)
    -> the prompts' text conditions, once (what training reads) -> one `generate-shard` task run per shard,
    mapped over the task runner -> indexes, metadata -> TableRef

Same sharding, resumption and artifacts for both; exactly-once with any number of overlapping runs or workers
(docs/exactly-once.md); on a Ray cluster each shard is one Ray task (infra/SCALE_OUT.md); on a GPU cluster see
infra/GPU_CLUSTER.md.
"""

from __future__ import annotations

import random
import time
from typing import Any

from prefect import flow
from prefect.futures import as_completed
from tqdm.auto import tqdm

from instaflow_core.config import InstaflowConfig, ModelsConfig, OrchestrationConfig, StorageConfig
from instaflow_core.generation.shards import parse_shard_slice
from instaflow_core.generation.triplets import PairsJob
from instaflow_core.refs import ModelKind, ModelRef, Stage, TableRef
from tasks.artifacts import Progress, run_logger
from tasks.generation import (
    encode_conditions,
    finish_pairs,
    generate_preview,
    pairs_shard,
    plan_pairs,
    prepare_pairs_table,
    report_pairs,
    slice_ref,
    wrote_now,
)
from tasks.runners import make_task_runner
from tasks.teacher import teacher_model


@flow(name="instaflow-pairs")
def pairs_flow(
    job: PairsJob,
    prompts: TableRef,
    model: ModelRef,
    storage_cfg: StorageConfig,
    orchestration_cfg: OrchestrationConfig,
    models_cfg: ModelsConfig | None = None,
    *,
    stage: Stage = Stage.GENERATE,
    shard_slice: str | None = None,
) -> TableRef:
    """Plan, prepare, map the shards over the configured task runner, finish (a subflow of `stage`'s flow).

    `shard_slice="i/N"` makes only every N-th shard starting at i (N independent runs, e.g. one per GPU node,
    share the work) and returns the table as it is, without the completeness check; a final run without a
    slice finds every shard done, then indexes the table and returns the complete reference.
    """
    t0 = time.perf_counter()
    sliced = parse_shard_slice(shard_slice)
    all_shards = plan_pairs(job, prompts, model, storage_cfg)
    shape = prepare_pairs_table(job, model, prompts, storage_cfg, models_cfg)
    conditions = encode_conditions(job, model, prompts, storage_cfg, models_cfg)
    expected = sum(s.n_prompts for s in all_shards) * job.pairs.images_per_prompt
    shards = [s for s in all_shards if sliced is None or s.index % sliced[1] == sliced[0]]
    run_logger().info(
        "%s: %d shards, %d triplets expected, latents %s, solver %s, runner %s x%d",
        job.table, len(shards), expected, tuple(shape), job.solver.column(),
        orchestration_cfg.task_runner, orchestration_cfg.max_workers,
    )  # fmt: skip

    overall = Progress(f"{job.table}: shards done")
    bar = tqdm(total=len(shards), desc=f"{job.table} shards", unit="shard", position=0)
    shard_args = {
        "job": job, "prompts": prompts, "model": model, "storage_cfg": storage_cfg, "models_cfg": models_cfg,
        "lease_ttl_s": orchestration_cfg.lease_ttl_s, "rows_per_commit": orchestration_cfg.rows_per_commit,
    }  # fmt: skip
    results: list[dict[str, Any]] = []
    # Start at a random shard: overlapping runs (or slices re-run by hand) then take different shards first and
    # share the work, instead of the later one waiting on every lease the earlier one holds.
    start = random.randrange(len(shards)) if shards else 0
    with make_task_runner(orchestration_cfg) as runner:
        futures = [
            runner.submit(pairs_shard, parameters={**shard_args, "shard": shard})
            for shard in shards[start:] + shards[:start]
        ]
        for fut in as_completed(futures):
            results.append(fut.result())  # re-raises a failed shard's error (the others' commits stay)
            bar.update(1)
            overall.update(len(results) / max(len(shards), 1))
    bar.close()

    if sliced is not None:
        return slice_ref(job, model, prompts, storage_cfg, results, shard_slice or "")
    ref = finish_pairs(job, model, prompts, storage_cfg, expected, conditions)
    preview = (
        generate_preview(job, ref, model, prompts, storage_cfg, models_cfg, len(shards))
        if wrote_now(results)
        else ""
    )
    report_pairs(
        job, ref, prompts, model, results, expected=expected, shape=shape,
        seconds=time.perf_counter() - t0, preview=preview, stage=stage,
    )  # fmt: skip
    return ref


@flow(name="instaflow-generate")
def generate_flow(
    cfg: InstaflowConfig, prompts: TableRef, teacher: ModelRef | None = None, shard_slice: str | None = None
) -> TableRef:
    """Prompts table version + teacher -> the `triplets` table version holding every (prompt, seed) triplet.

    Reads `generation`, `models`, `storage` and `orchestration` (task runner, workers). `shard_slice` ("i/N")
    makes only every N-th shard (several runs share the work; see infra/GPU_CLUSTER.md).
    """
    if teacher is None:
        teacher = teacher_model(cfg.models, cfg.storage)
    # a pretrained teacher (1-RF) is a rectified flow: Euler steps along its velocity, like the 2-RF's pairs
    job = PairsJob.from_generation(cfg.generation, rectified_flow=teacher.kind == ModelKind.RF1)
    return pairs_flow(
        job, prompts, teacher, cfg.storage, cfg.orchestration, cfg.models, shard_slice=shard_slice
    )
