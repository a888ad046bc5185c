"""Run by tests/integration/test_training_curves_multiprocess.py under `accelerate launch --num_processes 2`:
trains the Gaussian-mixture toy through `train` with an evaluator (DDP, or FSDP2 with the EMA sharded) and
leaves, per rank, which steps it evaluated and what the evaluator saw."""

from __future__ import annotations

import json
import os
import sys

import torch

from instaflow_core.config import TrainConfig, TrainStageConfig
from instaflow_core.experiments.gmm import MLPVelocity, make_mixture, noise_data_batches, reflow_loss_fn


class Probe:
    every_steps = 3

    def __init__(self) -> None:
        self.points: list[dict] = []

    def __call__(self, step: int, ema_module: torch.nn.Module) -> dict:
        from torch.distributed.tensor import DTensor

        params = list(ema_module.parameters())
        norm = float(torch.cat([p.detach().flatten() for p in params]).norm())
        plain = not any(isinstance(p, DTensor) for p in params)
        self.points.append(
            {"step": step, "norm": norm, "plain": plain, "numel": sum(p.numel() for p in params)}
        )
        return {"fid": norm}


def main(out: str, mode: str) -> None:
    from instaflow_core.training import train

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    mix = make_mixture(dim=2, num_classes=2, modes_per_class=2)
    cfg = TrainConfig(
        stages=[TrainStageConfig(steps=8, batch_size=8, micro_batch_size=4)],
        lr=1e-2,
        warmup_steps=0,
        checkpoint_every=4,
        log_every=2,
        ema_decay=0.9,
        num_processes=2,
        fsdp={"enabled": mode == "fsdp", "wrap": "none"},
    )
    torch.manual_seed(0)
    model = MLPVelocity(2, 2, hidden=16, depth=2, t_freqs=2)
    probe, records = Probe(), []
    res = train(
        model, noise_data_batches(mix, seed=1), reflow_loss_fn(null_class=2, p_uncond=0.0), cfg,
        os.path.join(out, f"ckpt-{mode}"), evaluator=probe, on_eval=records.append,
    )  # fmt: skip
    ema = None
    if res.ema_model is not None:
        ema = float(torch.cat([p.detach().flatten() for p in res.ema_model.parameters()]).norm())
    from torch.distributed.fsdp import FSDPModule

    sharded = any(isinstance(m, FSDPModule) for m in model.modules())  # FSDP2 shards the model in place
    with open(os.path.join(out, f"{mode}-rank-{rank}.json"), "w") as fh:
        json.dump(
            {
                "points": probe.points,
                "records": [r["step"] for r in records],
                "ema_norm": ema,
                "sharded": sharded,
            },
            fh,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
