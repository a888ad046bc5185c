"""SD 2.x (v-prediction) through the SD family (instaflow_core/models/sd.py), on the SD 2.1-shaped repo
(tests/support/teacher_repos.py: DDIMScheduler with `prediction_type="v_prediction"`, OpenCLIP-H's 23 layers):

- parity: our triplet latents (`generation.solvers.teacher_latents`) equal diffusers' StableDiffusionPipeline
  (loaded by hub id from the offline cache) for the repo's DDIM, DPM-Solver++ and Euler built from its config,
  fp32, classifier-free guidance 7.5;
- every scheduler the family builds keeps the teacher's v-prediction;
- a saved student folder is a StableDiffusionPipeline folder (the SD family's layout, its scheduler the base's)
  that diffusers and `InstaFlowPipeline` load.

diffusers' pipeline modules get `requires_grad_(False)`, as ours have (see test_family_sdxl.py: other CPU kernels
otherwise, last-bit differences that a random v-prediction UNet under guidance 7.5 amplifies).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instaflow_core.generation.solvers import teacher_latents
from instaflow_core.inference.generate import flow_images
from instaflow_core.models.loading import load_source
from instaflow_core.models.sd import FAMILY as SD
from instaflow_core.models.sd import make_scheduler
from instaflow_core.rectified_flow import noise_from_seeds
from tests.support.teacher_repos import SD21 as SD21_REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of a cat on a table", "a red car on a street"]
SEEDS = [3, 11]
RES = 64  # px: 8x8 latents, the fixture's native size


def _pipe(source: str | Path, scheduler: str | None = None):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        source, dtype=torch.float32
    )  # transformers 5: else the configs dtype
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd21_hub(teacher_hub: Path) -> str:
    """The repo's hub id, resolved from the offline cache of the teacher repos."""
    return SD21_REPO


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "euler"])
def test_v_prediction_teacher_latents_equal_diffusers(scheduler: str, sd21_hub: str) -> None:
    model = load_source(sd21_hub)
    assert model.family is SD and model.scheduler.config.prediction_type == "v_prediction"
    steps, guidance = 4, 7.5
    ours = teacher_latents(
        model, PROMPTS, SEEDS, steps=steps, guidance=guidance, scheduler=scheduler, resolution=RES
    )
    pipe = _pipe(sd21_hub, None if scheduler == "ddim" else scheduler)  # ddim: the repo's own
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    x0 = noise_from_seeds(SEEDS, (4, RES // 8, RES // 8))
    theirs = pipe(
        PROMPTS, latents=x0, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
        height=RES, width=RES,
    ).images  # fmt: skip
    diff = (ours - theirs).abs().max().item()
    print(f"sd21 {scheduler}: max abs diff {diff:.3g} (|x1| max {theirs.abs().max().item():.3g})")
    assert ours.shape == theirs.shape == (2, 4, 8, 8)
    assert diff < 1e-4


def test_every_family_scheduler_keeps_v_prediction(sd21_folder: Path) -> None:
    model = load_source(sd21_folder)
    for name in SD.schedulers:
        sched = make_scheduler(name, model.scheduler.config)
        assert sched.config.prediction_type == "v_prediction", name


def test_sd21_student_folder_is_a_stable_diffusion_folder(sd21_folder: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from instaflow_core.inference.pipeline import InstaFlowPipeline

    model = load_source(sd21_folder)
    out = SD.save_student(sd21_folder, model.denoiser, tmp_path / "2rf", {"kind": "2rf"}, sample_size=8)
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]  # the SD family keeps the base's scheduler
    theirs = _pipe(out)
    assert isinstance(theirs, StableDiffusionPipeline) and theirs.safety_checker is None
    ours = InstaFlowPipeline.from_pretrained(out)
    ours.set_progress_bar_config(disable=True)
    student = load_source(out)
    x0 = noise_from_seeds(SEEDS[:1], (4, 8, 8))
    latents = ours(PROMPTS[0], latents=x0, output_type="latent").images
    images = flow_images(student, PROMPTS[:1], SEEDS[:1], 1)
    assert images.shape == (1, 64, 64, 3)
    assert torch.allclose(latents, x0 + student.velocity()(x0, 0.0, student.encode(PROMPTS[:1])), atol=1e-5)
