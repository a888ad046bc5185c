"""Teacher ODE solving (the SD family's sampler through `teacher_latents`): equal to diffusers'
StableDiffusionPipeline, batch-invariant, noise from seeds; `flow_latents` is the Euler sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from instaflow_core.errors import ConfigError, DataError
from instaflow_core.generation.solvers import flow_latents, teacher_latents
from instaflow_core.inference.images import decode_latents
from instaflow_core.models.family import Model
from instaflow_core.models.sd import make_scheduler
from instaflow_core.rectified_flow import euler_sample, noise_from_seeds

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of a cat", "a red car on a street", "a bowl of soup"]
SEEDS = [11, 22, 33]


def _sd_pipe(c: Model, scheduler: str) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        unet=c.denoiser,
        scheduler=make_scheduler(scheduler, c.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_noise_from_seeds_is_per_row_and_cpu_generated() -> None:
    x0 = noise_from_seeds([5, 6, 7], (4, 8, 8))
    assert x0.shape == (3, 4, 8, 8) and x0.dtype == torch.float32
    assert torch.equal(x0[1], torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(6)))
    # a row depends on its seed only, not on its neighbours or position
    assert torch.equal(noise_from_seeds([7], (4, 8, 8))[0], x0[2])
    assert not torch.equal(x0[0], x0[1])


@pytest.mark.parametrize(
    ("scheduler", "guidance"), [("dpmsolver++", 5.0), ("dpmsolver++", 1.0), ("euler", 5.0), ("ddim", 3.0)]
)
def test_teacher_latents_equals_stable_diffusion_pipeline(
    tiny: Model, scheduler: str, guidance: float
) -> None:
    x1 = teacher_latents(tiny, PROMPTS, SEEDS, steps=4, guidance=guidance, scheduler=scheduler)
    x0 = noise_from_seeds(SEEDS, tiny.latent_shape())
    ref = _sd_pipe(tiny, scheduler)(
        PROMPTS, num_inference_steps=4, guidance_scale=guidance, latents=x0, output_type="latent"
    ).images
    assert x1.shape == (3, 4, 8, 8) and x1.dtype == torch.float32
    assert torch.allclose(x1, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max())), (x1 - ref).abs().max()


def test_teacher_latents_negative_prompt_matches_pipeline(tiny: Model) -> None:
    x1 = teacher_latents(tiny, PROMPTS[:2], SEEDS[:2], steps=3, guidance=4.0, negative_prompt="blurry")
    ref = _sd_pipe(tiny, "dpmsolver++")(
        PROMPTS[:2],
        negative_prompt=["blurry"] * 2,
        num_inference_steps=3,
        guidance_scale=4.0,
        latents=noise_from_seeds(SEEDS[:2], tiny.latent_shape()),
        output_type="latent",
    ).images
    assert torch.allclose(x1, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))
    plain = teacher_latents(tiny, PROMPTS[:2], SEEDS[:2], steps=3, guidance=4.0)
    assert not torch.allclose(x1, plain)


def test_teacher_latents_is_batch_invariant(tiny: Model) -> None:
    together = teacher_latents(tiny, PROMPTS, SEEDS, steps=3, guidance=5.0)
    alone = torch.cat(
        [teacher_latents(tiny, [p], [s], steps=3, guidance=5.0) for p, s in zip(PROMPTS, SEEDS, strict=True)]
    )
    reordered = teacher_latents(tiny, PROMPTS[::-1], SEEDS[::-1], steps=3, guidance=5.0).flip(0)
    scale = float(together.abs().max())
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-5 * scale)
    assert torch.allclose(together, reordered, rtol=1e-5, atol=1e-5 * scale)
    # and it is deterministic: the scheduler's multistep state does not leak between calls
    assert torch.equal(together, teacher_latents(tiny, PROMPTS, SEEDS, steps=3, guidance=5.0))


def test_teacher_latents_mixed_precision_runs(tiny: Model) -> None:
    x1 = teacher_latents(tiny, PROMPTS[:1], SEEDS[:1], steps=2, guidance=2.0, mixed_precision="bf16")
    assert x1.dtype == torch.float32 and torch.isfinite(x1).all()


def test_teacher_latents_rejects_bad_input(tiny: Model) -> None:
    with pytest.raises(DataError, match="2 prompts but 1 seeds"):
        teacher_latents(tiny, PROMPTS[:2], SEEDS[:1])
    with pytest.raises(ConfigError, match="scheduler"):
        teacher_latents(tiny, PROMPTS[:1], SEEDS[:1], steps=1, scheduler="plms")
    with pytest.raises(ConfigError, match="mixed_precision"):
        teacher_latents(tiny, PROMPTS[:1], SEEDS[:1], steps=1, mixed_precision="fp8")
    assert teacher_latents(tiny, [], []).shape == (0, 4, 8, 8)


def test_flow_latents_is_the_euler_sampler(tiny: Model) -> None:
    # a constant velocity field: every Euler step count lands on x0 + c exactly
    c = torch.randn(2, 4, 8, 8)
    x0 = noise_from_seeds([1, 2], (4, 8, 8))
    const = lambda x, t, cond: c  # noqa: E731
    for steps in (1, 4):
        got = flow_latents(tiny, PROMPTS[:2], [1, 2], steps=steps, guidance=1.0, velocity=const)
        assert torch.allclose(got, x0 + c, atol=1e-6)
    # over the family's velocity with guidance it is rectified_flow.euler_sample
    model = tiny.velocity()
    cond, uncond = tiny.encode(PROMPTS[:2]), tiny.negative([""] * 2)
    got = flow_latents(tiny, PROMPTS[:2], [1, 2], steps=2, guidance=1.5)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.equal(got, euler_sample(model, x0, cond, 2, guidance=1.5, uncond=uncond))


def test_decode_latents_matches_pipeline_postprocessing(tiny: Model) -> None:
    x1 = teacher_latents(tiny, PROMPTS[:2], SEEDS[:2], steps=2, guidance=1.0) * 0.01  # keep decodes in range
    images = decode_latents(tiny, x1, batch_size=1)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    with torch.no_grad():
        ref = tiny.vae.decode(x1 / tiny.vae.config.scaling_factor).sample
    ref = ((ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.abs(images.astype(int) - ref.astype(int)).max() <= 1
