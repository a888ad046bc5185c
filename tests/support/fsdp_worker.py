"""Run by tests/integration/test_fsdp.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU):
trains a tiny diffusers FLUX transformer through `train` with `fsdp.enabled`, sharded per transformer block.

    fsdp_worker.py OUT ref-then-kill   # the uninterrupted run into OUT/ref, then a run into OUT/run that
                                       # SIGKILLs itself inside step KILL_STEP (after checkpoint KILL_STEP - 1)
    fsdp_worker.py OUT resume          # a fresh process resumes OUT/run from its latest checkpoint

Each finished run leaves `<name>-rank<r>.json` (history, sharding evidence) and, from the main process, the
exported EMA as `<name>-ema.safetensors`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from instaflow_core.config import TrainConfig, TrainStageConfig
from instaflow_core.training import BatchRequest, train

SEQ, CH, TXT, DIM, POOLED = 16, 4, 4, 16, 8  # packed latent tokens x channels; text tokens x width
KILL_STEP = 4  # inside stage 0 (steps 1-4 take 2 micro-batches each): call 7 is step 4's first


class FluxVelocity(nn.Module):
    """v(x_t, t, text) through a FLUX transformer (the shape of the real student: blocks inside a wrapper that
    names no `_no_split_modules` itself, as StudentVelocity around a UNet)."""

    def __init__(self, seed: int) -> None:
        from diffusers import FluxTransformer2DModel

        super().__init__()
        torch.manual_seed(seed)
        self.transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=CH, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=DIM, pooled_projection_dim=POOLED,
            guidance_embeds=False, axes_dims_rope=(2, 2, 4),
        )  # fmt: skip
        self.register_buffer("img_ids", torch.zeros(SEQ, 3), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(TXT, 3), persistent=False)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        return self.transformer(
            hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
            img_ids=self.img_ids, txt_ids=self.txt_ids, return_dict=False,
        )[0]  # fmt: skip


def config() -> TrainConfig:
    return TrainConfig(
        # stage 0 accumulates (8 = micro 2 x 2 processes x 2), stage 1 does not and has its own lr
        stages=[
            TrainStageConfig(steps=5, batch_size=8, micro_batch_size=2),
            TrainStageConfig(steps=3, batch_size=4, micro_batch_size=2, lr=2e-3),
        ],
        lr=5e-3,
        warmup_steps=2,
        ema_decay=0.7,
        grad_clip=0.5,
        checkpoint_every=1,  # every step's weights and EMA on disk: the test checks the average from them
        keep_checkpoints=None,
        log_every=1,
        seed=5,
        num_processes=2,
        fsdp={"enabled": True},
    )


def batches(req: BatchRequest):
    """This rank's deterministic micro-batches of a stage, from micro-batch `req.start` on."""
    g = torch.Generator().manual_seed(1000 * req.stage_index + req.rank)
    n = req.micro_batch_size
    drawn = 0
    while True:
        batch = {
            "x1": torch.randn(n, SEQ, CH, generator=g),
            "text": torch.randn(n, TXT, DIM, generator=g),
            "pooled": torch.randn(n, POOLED, generator=g),
        }
        if drawn >= req.start:
            yield batch
        drawn += 1


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    """Rectified-flow loss; X0 and t come from the global RNG, which a resume must restore."""
    x1 = batch["x1"]
    x0 = torch.randn_like(x1)
    t = torch.rand(x1.shape[0])
    xt = t[:, None, None] * x1 + (1 - t[:, None, None]) * x0
    v = model(xt, t, batch["text"], batch["pooled"])
    return (v - (x1 - x0)).pow(2).mean()


def killed_at(step: int):
    calls = {"n": 0}

    def fn(model: nn.Module, batch: dict) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2 * (step - 1) + 1:  # the first micro-batch of `step`
            os.kill(os.getpid(), signal.SIGKILL)
        return loss_fn(model, batch)

    return fn


def evidence(model: nn.Module) -> dict:
    """What FSDP made of the model on this rank: its units and how much of each parameter this rank holds."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return {
        "units": sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)),
        "dtensors": all(isinstance(p, DTensor) for p in params),
        "local": sum(p.to_local().numel() for p in params if isinstance(p, DTensor)),
        "full": sum(p.numel() for p in params),
    }


def run(out: Path, name: str, fn) -> None:
    rank = int(os.environ.get("RANK", "0"))
    model = FluxVelocity(seed=10 + rank)  # different init per rank on purpose: rank 0's must win
    res = train(model, batches, fn, config(), str(out / name))
    record = {"steps": res.steps, "history": res.history, **evidence(model)}
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(record))
    if res.ema_model is not None:
        save_file(dict(res.ema_model.state_dict()), str(out / f"{name}-ema.safetensors"))
    assert (res.ema_model is not None) == (rank == 0), "the exported EMA lives on the main process only"


def main(out: str, mode: str) -> None:
    torch.set_num_threads(1)
    root = Path(out)
    if mode == "ref-then-kill":
        run(root, "ref", loss_fn)
        run(root, "run", killed_at(KILL_STEP))
        raise SystemExit("not killed")
    run(root, "run", loss_fn)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
