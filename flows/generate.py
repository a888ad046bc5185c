"""Stage 2: the teacher turns (prompt, seed) into triplets (prompt, X0 seed, X1), sharded and exactly-once.

The shard fan-out is `flows/pairs.py` (shared with distillation's pairs). Run on a GPU cluster: see
infra/GPU_CLUSTER.md.
"""

from __future__ import annotations

from prefect import flow

from flows.pairs import run_pairs
from instaflow_core.config import InstaflowConfig
from instaflow_core.generation.triplets import PairsJob
from instaflow_core.refs import ModelKind, ModelRef, TableRef
from tasks.teacher import teacher_model


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
    return run_pairs(
        job, prompts, teacher, cfg.storage, cfg.orchestration, cfg.models, shard_slice=shard_slice
    )
