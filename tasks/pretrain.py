"""Prefect tasks of teacher pretraining (`models.teacher: pretrain`): the fresh model, then its training.

    pretrain-init   the digits model built from `models.digits` (seeded), saved as a diffusers folder in the
                    store (cached on the models section: the same weights every run)
    pretrain-train  a text-conditioned 1-rectified flow on the curated (image, caption) pairs with independent
                    noise, through the training core like reflow (instaflow_core/training/pretrain.py):
                    checkpoints, resume, an MLflow run, the sample grid -> models/1rf-<key>/

The result is a ModelRef of kind `1rf`: generation, reflow, distillation and evaluation take it as the teacher.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from prefect import task

from instaflow_core.config import ModelsConfig, RegistrationConfig, StorageConfig, TrainConfig, stable_hash
from instaflow_core.refs import ModelKind, ModelRef, TableRef
from instaflow_core.store import Store
from tasks.caching import stage_cache_key
from tasks.training import make_job, run_stage, training_cache_key

logger = logging.getLogger("instaflow.tasks.pretrain")


@task(cache_key_fn=stage_cache_key, persist_result=True, name="pretrain-init")
def pretrain_init(models_cfg: ModelsConfig, storage_cfg: StorageConfig) -> ModelRef:
    """The fresh (random-init, seeded) model pretraining starts from, saved under <root>/models/."""
    from instaflow_core.training.pretrain import save_initial_folder

    config_hash = stable_hash(models_cfg.digits.model_dump(mode="json"))
    store = Store(storage_cfg)
    uri = store.uri("models", f"1rf-init-{config_hash}")
    with tempfile.TemporaryDirectory(prefix="instaflow-pretrain-") as tmp:
        folder = Path(tmp) / "init"
        weights = save_initial_folder(models_cfg, folder)
        store.put_dir(folder, uri, clean=True)
    logger.info("initial digits model %s -> %s", weights, uri)
    return ModelRef(uri=uri, kind=ModelKind.RF1, config_hash=config_hash, source=f"digits-init-{weights}")


@task(cache_key_fn=training_cache_key, persist_result=True, name="pretrain-train")
def train_pretrain(
    pretraining: TrainConfig,
    storage: StorageConfig,
    prompts: TableRef,
    base: ModelRef,
    registry: RegistrationConfig,
    mlflow_parent_run_id: str | None = None,
) -> ModelRef:
    """The 1-Rectified Flow teacher: `base` trained on the train images of the prompts' image table."""
    job = make_job("pretrain", pretraining, storage, prompts, base)
    ref, _ = run_stage(job, registry, mlflow_parent_run_id)
    return ref
