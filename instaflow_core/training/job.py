"""A training stage as one object: `TrainJob` (typed section in, saved model folder out).

    TrainJob.make(stage, section, storage, data, base)   the job: its key and where its checkpoints, model folder
                                                          and sample grid go in the store
    job.check_inputs()                                    an empty table or latents that do not fit the base model
                                                          fail before any training (and any MLflow run)
    job.execute(on_log, on_eval)                          train (in this process, or `accelerate launch` on
                                                          `num_processes` processes), then write the EMA
                                                          denoiser as a folder of the base's family and layout,
                                                          a sample grid, and summary.json next to the checkpoints;
                                                          with `curves` (evaluation.during_training) the EMA
                                                          weights are evaluated every few steps (on_eval)
    job.ref()                                             the ModelRef of the saved folder

The stage's identity is `key = hash(stage, data table ref, base model ref, section hash)`: it names the checkpoint
folder `<store>/checkpoints/<stage>-<key>/` (a rerun with the same inputs resumes from the last checkpoint, even
after a kill) and the model folder `<store>/models/<kind>-<key>/`. The key leaves the code version out on
purpose: a code edit (or `--refresh reflow`) re-runs the task, which then resumes at the finished checkpoint and
only re-saves the folder instead of throwing away the GPU time; delete the checkpoint folder (or change the
section, e.g. its seed) to train from scratch.

`num_processes > 1`: the job is written as JSON and `accelerate launch --num_processes N [launcher_args] -m
instaflow_core.training.entry job.json` runs it on every process (infra/ACCELERATE.md); the main process prints
its log records, evaluation points, summary and errors as `INSTAFLOW_EVENT {json}` lines, which `launch` relays
to `on_log` / `on_eval`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

from instaflow_core.config import DistillationConfig, ModelsConfig, StorageConfig, TrainConfig, stable_hash
from instaflow_core.errors import ConfigError, DataError, InstaflowError, StorageError, TrainingError
from instaflow_core.evaluation.curves import CurveSpec
from instaflow_core.inference.images import image_grid, png_bytes
from instaflow_core.models.geometry import Geometry
from instaflow_core.models.loading import model_geometry
from instaflow_core.models.sources import local_model_path
from instaflow_core.refs import TRAINED_KIND, ModelKind, ModelRef, Stage, TableRef
from instaflow_core.store import Store

log = logging.getLogger("instaflow.training")

EVENT_PREFIX = "INSTAFLOW_EVENT "  # stdout lines of instaflow_core.training.entry that `launch` relays
SUMMARY_FILE = "summary.json"  # in the checkpoint folder: what the finished stage produced
TRAINING_STAGES = (Stage.PRETRAIN, Stage.REFLOW, Stage.DISTILL)
_REPO = Path(__file__).resolve().parents[2]
_ERRORS: dict[str, type[InstaflowError]] = {
    c.__name__: c for c in (InstaflowError, ConfigError, DataError, StorageError, TrainingError)
}


def section_class(stage: Stage) -> type[TrainConfig]:
    """The config section type a training stage reads."""
    return DistillationConfig if stage == Stage.DISTILL else TrainConfig


class TrainJob(BaseModel):
    """Everything one training stage needs, as JSON: what the Prefect task runs in process, or hands to
    `accelerate launch -m instaflow_core.training.entry <job.json>` on every process when training is distributed.
    """

    model_config = ConfigDict(extra="forbid")

    stage: Literal[Stage.PRETRAIN, Stage.REFLOW, Stage.DISTILL]
    key: str  # hash of the inputs and the section: names the checkpoint and model folders
    section: SerializeAsAny[TrainConfig]  # DistillationConfig for distill (validated by stage)
    storage: StorageConfig
    data: TableRef  # triplets (reflow), distill_pairs (distill) or prompts (pretrain: its image table's captions)
    base: ModelRef  # the model the student starts from and whose folder the result copies
    ckpt_dir: str
    out_uri: str
    samples_uri: str
    # how an external base (a hub id teacher) resolves, and models.save_variants; not part of the stage's key
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    # quality curves while training (evaluation.during_training): not part of the key, it changes no weight
    curves: CurveSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _typed_section(cls, data: Any) -> Any:
        """The section as its stage's own type (a JSON job file carries it as a mapping)."""
        if isinstance(data, dict) and isinstance(data.get("section"), dict) and "stage" in data:
            data = {**data, "section": section_class(Stage(data["stage"])).model_validate(data["section"])}
        return data

    # ---- identity -------------------------------------------------------------------------------------
    @staticmethod
    def stage_key(stage: Stage, data: TableRef, base: ModelRef, section: TrainConfig) -> str:
        """hash(stage, data ref, base model ref, section hash): the identity of a training stage's result."""
        # gpu_memory_gb only gates the preflight: setting it must not retrain (a new key) from scratch
        section_hash = stable_hash(section.model_dump(mode="json", exclude={"gpu_memory_gb"}))
        return stable_hash(
            {"stage": str(stage), "data": data.key(), "base": base.key(), "section": section_hash}
        )

    @classmethod
    def make(
        cls,
        stage: Stage,
        section: TrainConfig,
        storage: StorageConfig,
        data: TableRef,
        base: ModelRef,
        models: ModelsConfig | None = None,
        curves: CurveSpec | None = None,
    ) -> TrainJob:
        """The stage's job: where its checkpoints, model folder and sample grid go in the store."""
        key = cls.stage_key(stage, data, base, section)
        store = Store(storage)
        kind = TRAINED_KIND[stage]
        return cls(
            stage=stage,
            key=key,
            section=section,
            storage=storage,
            data=data,
            base=base,
            ckpt_dir=store.uri("checkpoints", f"{stage}-{key}"),
            out_uri=store.uri("models", f"{kind}-{key}"),
            samples_uri=store.uri("samples", f"{kind}-{key}.png"),
            models=models or ModelsConfig(),
            curves=curves,
        )

    @property
    def out_kind(self) -> ModelKind:
        return TRAINED_KIND[self.stage]

    def sample_settings(self) -> tuple[int, float]:
        """(steps, guidance) of the final sample grid: the one-step model is shown at 1 step, no guidance."""
        cfg = self.section
        return (1, 1.0) if self.stage == Stage.DISTILL else (cfg.sample_steps, cfg.sample_guidance)

    def ref(self) -> ModelRef:
        """The saved folder as a reference (store-relative: a moved store still resolves it)."""
        return ModelRef(
            uri=Store(self.storage).relative(self.out_uri),
            kind=self.out_kind,
            config_hash=stable_hash(self.section.model_dump(mode="json")),
            source=f"{self.out_kind}-{self.key}",  # the identity distill pairs and evaluations key on
        )

    # ---- checks ---------------------------------------------------------------------------------------
    def geometry(self) -> Geometry:
        return model_geometry(self.base.uri, self.storage, self.models, kind=str(self.base.kind))

    def latents(self) -> tuple[tuple[int, int, int], Geometry]:
        """The latent shape the job trains on: the table's (checked against the base model at the resolution
        the table was made at), or for pretraining, whose data are images, the base model's native one."""
        from instaflow_core.store.dataset import table_latents

        geometry = self.geometry()
        if self.stage == Stage.PRETRAIN:
            return geometry.latent_shape(None), geometry
        shape, resolution = table_latents(self.data, self.storage)
        if resolution is not None:
            problem = geometry.problem(resolution, "that size")
            want = None if problem else geometry.latent_shape(resolution)
            if problem or tuple(shape) != want:
                why = (
                    f"cannot run at that size ({problem})" if problem else f"makes {want} at that resolution"
                )
                raise DataError(
                    f"triplets table {self.data.key()} holds latents of shape {tuple(shape)} made at {resolution} "
                    f"px, but the model {self.base.uri} {why}: generate triplets with this teacher"
                )
        problem = geometry.latent_problem(tuple(shape))
        if problem:
            raise DataError(
                f"triplets table {self.data.key()} does not fit the model {self.base.uri}: {problem}"
            )
        return tuple(int(s) for s in shape), geometry  # type: ignore[return-value]

    def check_inputs(self) -> tuple[int, int, int]:
        """Fail before any training when the table is empty or its latents do not fit the base model."""
        from instaflow_core.store.dataset import validate_triplets

        cfg = self.section
        if self.stage == Stage.PRETRAIN:
            from instaflow_core.training.pretrain import check_pretrain_inputs

            need = max((st.micro_batch_size or st.batch_size // cfg.num_processes) for st in cfg.stages)
            check_pretrain_inputs(self.data, self.storage, need)
            return self.latents()[0]
        rows = validate_triplets(self.data, self.storage, None)
        shape, _ = self.latents()
        for i, st in enumerate(cfg.stages):
            need = (st.micro_batch_size or st.batch_size // cfg.num_processes) * cfg.num_processes
            if rows < need:
                raise DataError(
                    f"{self.data.key()} has {rows} rows, fewer than one micro-batch per process of "
                    f"{self.stage.section}.stages.{i} ({need}): lower its batch_size / micro_batch_size or make "
                    f"more {self.data.table}"
                )
        return shape

    def resume_step(self) -> int:
        """The optimizer step the newest checkpoint in the job's ckpt_dir holds (0 = none)."""
        from instaflow_core.training.checkpoint import Checkpointer

        name = Checkpointer(self.ckpt_dir, Store(self.storage)).latest()
        return int(name.rsplit("-", 1)[-1]) if name else 0

    def summary(self) -> dict[str, Any] | None:
        """What the finished stage wrote next to its checkpoints (None before it finished once)."""
        store = Store(self.storage)
        uri = f"{self.ckpt_dir}/{SUMMARY_FILE}"
        return json.loads(store.read_bytes(uri)) if store.exists(uri) else None

    # ---- running --------------------------------------------------------------------------------------
    def execute(
        self, on_log: Callable[[dict], None] | None = None, on_eval: Callable[[dict], None] | None = None
    ) -> dict[str, Any]:
        """Train on `section.num_processes` processes (this one, or `accelerate launch`), then record the summary
        next to the checkpoints. The caller checked the inputs."""
        if self.section.num_processes > 1:
            summary = self.launch(on_log or (lambda r: None), on_eval)
        else:
            summary = self.run(on_log=on_log, on_eval=on_eval, validate=False)
        return summary

    def write_summary(self, summary: dict[str, Any]) -> None:
        Store(self.storage).write_bytes(
            f"{self.ckpt_dir}/{SUMMARY_FILE}", json.dumps(summary, indent=1, default=str).encode()
        )

    def run(
        self,
        *,
        accelerator: Any = None,
        on_log: Callable[[dict], None] | None = None,
        validate: bool = True,
        on_eval: Callable[[dict], None] | None = None,
    ) -> dict[str, Any]:
        """Train the stage's student in this process (resuming from its checkpoints), then, on the main process,
        write the final folder (EMA weights) and a sample grid PNG to the store. Returns a JSON-able summary.

        1. the student: the base model of its family, denoiser from `init_from` / fresh / the base's
        2. the loss: reflow's (pretrain, reflow) or one-step distillation's, conditions from the frozen encoders
        3. the batches: the triplet table (reflow, distill) or the image table with fresh noise (pretrain)
        4. `training.train`: stages, accumulation, EMA, checkpoints, resume
        5. the EMA denoiser saved as a folder of the base's layout, a sample grid
        """
        from instaflow_core.generation.conditions import (
            ENCODER_META,
            StoredConditions,
            conditions_of,
            encoder_identity,
        )
        from instaflow_core.training.loop import train
        from instaflow_core.training.losses import distill_batch_loss, reflow_batch_loss
        from instaflow_core.training.lpips import build_lpips, lpips_distance, vae_decoder
        from instaflow_core.training.setup import make_accelerator
        from instaflow_core.training.student import SCRATCH, ConditionCache, load_student

        cfg = self.section
        store = Store(self.storage)
        if validate:
            self.check_inputs()
        start = self.resume_step()
        acc = accelerator or make_accelerator(cfg)
        shape, geometry = (
            self.latents()
        )  # the latents trained on: the grid below and the saved denoiser use them

        # 1. the student: float32 master weights; bf16 is autocast (cfg.mixed_precision). With the prompts'
        # conditions in the store (the pairs flow encodes them once), the text encoders are never loaded.
        base_dir = local_model_path(self.base.uri, self.storage, self.models, kind=str(self.base.kind))
        scratch = cfg.init_from == SCRATCH
        init_dir = (
            local_model_path(cfg.init_from, self.storage, self.models, kind="init")
            if cfg.init_from and not scratch
            else None
        )
        stored = conditions_of(store, self.data) if self.stage != Stage.PRETRAIN else None
        model = load_student(base_dir, init_dir, skip_text=stored is not None)
        family = model.family
        if (
            scratch
        ):  # the base's architecture with fresh weights (seeded): e.g. a 2-RF not started from its teacher
            model.denoiser = family.fresh_denoiser(model.denoiser, cfg.seed)
        for name, module in model.modules().items():
            if name != family.denoiser:
                module.to(acc.device)
        model.denoiser.requires_grad_(True).train()
        student = model.velocity()
        conditions = StoredConditions(store, stored) if stored is not None else ConditionCache(model)

        # 2. the loss
        if self.stage in (Stage.REFLOW, Stage.PRETRAIN):
            loss_fn = reflow_batch_loss(
                conditions, cfg.t_schedule, cfg.huber_c, cfg.seed, cfg.caption_dropout
            )
        else:
            wants_lpips = any(st.loss == "lpips" for st in cfg.stages)
            lpips_net = build_lpips(cfg.lpips_weights).to(acc.device) if wants_lpips else None
            loss_fn = distill_batch_loss(
                conditions,
                cfg.huber_c,
                decode=vae_decoder(model) if wants_lpips else None,
                lpips=lpips_distance(lpips_net) if lpips_net is not None else None,
                caption_dropout=cfg.caption_dropout,
            )

        # 3. the batches
        if self.stage == Stage.PRETRAIN:  # (caption, image) pairs with independent noise, not triplets
            from instaflow_core.training.pretrain import image_batches

            batches = image_batches(self.data, self.storage, model, shape, cfg.seed)
        else:
            batches = triplet_batches(self.data, self.storage)

        # 4. train (evaluating the EMA weights every few steps when curves are on)
        curves, curve_setup = self._curves(model, base_dir, acc, start)
        relay = _labelled(on_eval, curves.info if curves is not None else {})
        result = train(
            student, batches, loss_fn, cfg, self.ckpt_dir, store=store, accelerator=acc, on_log=on_log,
            evaluator=curves, on_eval=relay,
        )  # fmt: skip
        summary: dict[str, Any] = {
            "start_step": start,
            "steps": result.steps,
            "final_loss": result.final_loss,
            "checkpoint": result.checkpoint,
            "history": result.history,
            "model_uri": self.out_uri,
            "samples_uri": self.samples_uri,
            "conditions": {
                "source": stored.key() if stored is not None else "text encoders (no stored conditions)",
                "hits": conditions.hits,
                "misses": conditions.misses,
            },
        }
        if curves is not None and acc.is_main_process:
            summary["curves"] = curves.summary(result.curve, curve_setup)

        # 5. the EMA denoiser (what the paper evaluates) as the stage's model, and its samples
        if acc.is_main_process:
            from instaflow_core.inference.generate import flow_images

            ema_net = result.ema_model.net
            meta = {
                "kind": self.out_kind,
                "stage": self.stage,
                "key": self.key,
                "steps": result.steps,
                "base": self.base.key(),
                "data": self.data.key(),
                "weights": "ema",
                "ema_decay": cfg.ema_decay,
                "checkpoint": result.checkpoint,
                ENCODER_META: encoder_identity(base_dir),  # the folder copies the base's encoders unchanged
            }
            with tempfile.TemporaryDirectory(prefix="instaflow-stage-") as tmp:
                folder = family.save_student(
                    base_dir, ema_net, Path(tmp) / "model", meta,
                    variants=self.models.save_variants, sample_size=shape[-2],
                )  # fmt: skip
                store.put_dir(folder, self.out_uri, clean=True)
            steps, guidance = self.sample_settings()
            prompts = list(cfg.sample_prompts)
            if stored is not None:  # the grid's prompts need the encoders: loaded now, training is over
                model = family.load(base_dir, skip=(family.denoiser,))
            model.denoiser = ema_net.eval()
            model.to(acc.device)
            images = flow_images(
                model, prompts, list(range(len(prompts))), steps, guidance,
                resolution=geometry.resolution_of(shape), batch_size=max(1, len(prompts)),
            )  # fmt: skip
            store.write_bytes(self.samples_uri, png_bytes(image_grid(images, background=255)))
            summary.update(sample_steps=steps, sample_guidance=guidance, sample_prompts=prompts)
        acc.wait_for_everyone()
        return summary

    def launch(
        self, on_log: Callable[[dict], None], on_eval: Callable[[dict], None] | None = None
    ) -> dict[str, Any]:
        """`accelerate launch` the job on section.num_processes processes; relay the main process's records."""
        cfg = self.section
        args = [os.path.expandvars(a) for a in cfg.launcher_args]  # e.g. "${NODE_RANK}" set by the scheduler
        modes = ("--multi_gpu", "--use_fsdp", "--use_deepspeed", "--config_file", "--cpu", "--tpu")
        if not any(a.split("=")[0] in modes for a in args):
            args.insert(0, "--multi_gpu")  # torchrun under the hood; gloo on CPU-only machines
        summary: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        tail: list[str] = []
        with tempfile.TemporaryDirectory(prefix="instaflow-job-") as tmp:
            path = Path(tmp) / "job.json"
            path.write_text(self.model_dump_json())
            cmd = [
                sys.executable, "-m", "accelerate.commands.launch",
                "--num_processes", str(cfg.num_processes), *args,
                "-m", "instaflow_core.training.entry", str(path), "--no-validate",
            ]  # fmt: skip
            log.info("launching: %s", " ".join(cmd))
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
            }
            proc = subprocess.Popen(
                cmd,
                cwd=_REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(EVENT_PREFIX):
                    event = json.loads(line[len(EVENT_PREFIX) :])
                    if event["type"] == "log":
                        on_log(event["record"])
                    elif event["type"] == "eval" and on_eval is not None:
                        on_eval(event["record"])
                    elif event["type"] == "summary":
                        summary = event["summary"]
                    elif event["type"] == "error" and error is None:
                        error = event
                else:
                    tail = (tail + [line.rstrip()])[-20:]
                    log.debug("%s", line.rstrip())
            rc = proc.wait()
        if error is not None:
            raise _ERRORS.get(error["class"], TrainingError)(error["message"])
        if rc != 0 or summary is None:
            last = "; ".join(x for x in tail[-3:] if x) or "no output"
            raise TrainingError(f"accelerate launch of {self.stage} exited with code {rc} ({last})")
        return summary

    # ---- quality during training ---------------------------------------------------------------------
    def _curves(self, model: Any, base_dir: Path, acc: Any, start: int) -> tuple[Any, float]:
        """The loop's evaluator (evaluation/curves.py) when this stage's curves are on, prepared on the main
        process when there is training left (networks, reference statistics: kept in the store); -> (evaluator
        or None, seconds it took)."""
        import time

        from instaflow_core.evaluation.curves import TrainingCurves

        spec = self.curves
        if spec is None or spec.evaluation.during_training.every(self.stage.section) <= 0:
            return None, 0.0
        curves = TrainingCurves(
            spec, self.stage, self.storage, self.models, self.data, model, base_dir, self.ckpt_dir
        )
        t0 = time.perf_counter()
        if acc.is_main_process and start < sum(st.steps for st in self.section.stages):
            curves.prepare()
        acc.wait_for_everyone()
        return curves, time.perf_counter() - t0


def _labelled(on_eval: Callable[[dict], None] | None, info: dict[str, Any]) -> Callable[[dict], None] | None:
    """on_eval with what the points are (setting, samples, metric names) added to each record."""
    if on_eval is None:
        return None
    labels = {
        k: info[k] for k in ("setting", "samples", "every_steps", "protocol", "metric_names") if k in info
    }
    return lambda record: on_eval({**record, **labels})


def triplet_batches(table: TableRef, storage: StorageConfig) -> Callable[[Any], Iterator[dict]]:
    """A batch factory for `training.train`: this rank's shuffled micro-batches of the table, epoch after epoch.

    Each (stage, epoch) gets its own permutation (`TripletDataset` shuffles with [seed, epoch]); short last
    batches are dropped so every step sees the configured batch size. Resuming at micro-batch `req.start`
    skips whole epochs arithmetically and reads only the remainder of the current one.
    """
    from instaflow_core.store.dataset import TripletDataset

    def factory(req: Any) -> Iterator[dict]:
        ds = TripletDataset(
            table,
            storage,
            req.micro_batch_size,
            rank=req.rank,
            world_size=req.world_size,
            shuffle=True,
            seed=int(stable_hash([req.seed, req.stage_index]), 16) & 0x7FFFFFFF,
            drop_last=True,
        )
        # Ranks are dealt whole blocks of rows (64 by default): on a small table use smaller blocks, so every
        # rank gets a share (at least ~4 blocks each).
        ds.block_rows = max(1, min(ds.block_rows, ds.num_rows // (4 * req.world_size)))
        per_epoch = len(ds)
        if per_epoch == 0:
            raise DataError(
                f"{table.key()}: fewer than {req.micro_batch_size} rows for rank {req.rank} of {req.world_size} "
                f"({ds.num_rows} rows in all): lower the stage's batch_size or make more triplets"
            )
        epoch, skip = divmod(req.start, per_epoch)
        while True:
            ds.set_epoch(epoch)
            for batch in ds:
                if skip:
                    skip -= 1
                    continue
                yield batch
            epoch += 1

    return factory
