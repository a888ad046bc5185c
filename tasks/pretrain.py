"""Prefect task of teacher pretraining's first step (`models.teacher: pretrain`): the fresh model.

    pretrain-init   the model built from the experiment's config section (`digits.model`, seeded), saved as a
                    diffusers folder in the store (cached on that section: the same weights every run)

The training itself is `tasks.training.train_pretrain` (the training core, like reflow); its result is a
ModelRef of kind `1rf`: generation, reflow, distillation and evaluation take it as the teacher.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from instaflow_core.config import StorageConfig, stable_hash
from instaflow_core.refs import ModelKind, ModelRef
from instaflow_core.store import Store
from tasks.caching import stage_cache_key

logger = logging.getLogger("instaflow.tasks.pretrain")
PRETRAIN_FAMILY = "digits"  # the architecture teacher pretraining builds (the experiment's section names it)


@task(cache_key_fn=stage_cache_key, persist_result=True, name="pretrain-init")
def pretrain_init(model_cfg: Any, storage_cfg: StorageConfig) -> ModelRef:
    """The fresh (random-init, seeded) model pretraining starts from, saved under <root>/models/."""
    from instaflow_core.training.pretrain import save_initial_folder

    config_hash = stable_hash(model_cfg.model_dump(mode="json"))
    store = Store(storage_cfg)
    uri = store.uri("models", f"1rf-init-{config_hash}")
    with tempfile.TemporaryDirectory(prefix="instaflow-pretrain-") as tmp:
        folder = Path(tmp) / "init"
        weights = save_initial_folder(PRETRAIN_FAMILY, model_cfg, folder)
        store.put_dir(folder, uri, clean=True)
    logger.info("initial %s model %s -> %s", PRETRAIN_FAMILY, weights, uri)
    return ModelRef(uri=uri, kind=ModelKind.RF1, config_hash=config_hash, source=f"digits-init-{weights}")
