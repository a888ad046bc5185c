"""Run by tests/integration/test_multiprocess.py under `accelerate launch --num_processes 2 --cpu`: trains a tiny model
through `train` on a rank-sharded deterministic dataset and leaves evidence in the output folder."""

from __future__ import annotations

import json
import os
import sys

import torch

from instaflow_core.config import TrainConfig, TrainStageConfig
from instaflow_core.experiments.gmm import MLPVelocity, make_mixture, reflow_loss_fn, tensor_batches
from instaflow_core.training import checkpoint as ckpt_mod
from instaflow_core.training import train

ROWS = 64


def main(out: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    mix = make_mixture(dim=2, num_classes=2, modes_per_class=2)
    g = torch.Generator().manual_seed(0)
    x1, cond = mix.sample(ROWS, g)
    data = {"idx": torch.arange(ROWS), "x0": torch.randn(ROWS, 2, generator=g), "x1": x1, "cond": cond}

    saves: list[int] = []
    real_save = ckpt_mod.Checkpointer.save

    def recording_save(self, step, files, state):  # who writes checkpoints?
        saves.append(step)
        return real_save(self, step, files, state)

    ckpt_mod.Checkpointer.save = recording_save

    seen: list[int] = []
    base_loss = reflow_loss_fn(null_class=2, p_uncond=0.0)

    def loss_fn(model, batch):
        seen.extend(int(i) for i in batch["idx"])
        return base_loss(model, batch)

    # 8 steps x batch 8 = 64 rows = one epoch; 8 = micro 2 x accumulation 2 x 2 processes
    cfg = TrainConfig(
        stages=[TrainStageConfig(steps=8, batch_size=8, micro_batch_size=2)],
        lr=1e-2,
        warmup_steps=0,
        checkpoint_every=4,
        log_every=2,
        ema_decay=0.9,
        keep_checkpoints=None,
    )
    torch.manual_seed(1234 + rank)  # different init per rank on purpose: DDP must broadcast rank 0's
    model = MLPVelocity(2, 2, hidden=16, depth=2, t_freqs=2)
    init = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    res = train(model, tensor_batches(data, seed=3), loss_fn, cfg, os.path.join(out, "ckpt"))
    torch.save(
        {
            "init": init,
            "final": torch.cat([p.detach().flatten() for p in model.parameters()]),
            "ema": torch.cat([p.detach().flatten() for p in res.ema_model.parameters()]),
        },
        os.path.join(out, f"weights-{rank}.pt"),
    )
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as fh:
        json.dump(
            {"seen": seen, "saves": saves, "steps": res.steps, "losses": [h["loss"] for h in res.history]}, fh
        )


if __name__ == "__main__":
    main(sys.argv[1])
