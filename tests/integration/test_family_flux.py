"""The flux family (FLUX.1-dev and FLUX.1-schnell, instaflow_core/models/flux.py) against diffusers' own
FluxPipeline, on the hub-shaped FLUX.1-dev and -schnell repos (tests/support/teacher_repos.py: double and single stream blocks,
2x2 packing of 16 latent channels, the guidance embedding for dev, the two repos' scheduler configs, bf16 weights
loaded in float32), on a CPU:

- conditions: our Condition is the pipeline's `encode_prompt` (T5 at 512 tokens for dev, 256 for schnell; CLIP's
  pooled output);
- packing: our pack / unpack / image ids are the pipeline's, and our latents stay (B, 16, h, w);
- triplets: `generation.solvers.teacher_latents` (our noise from seeds, our conditions, our latent layout) equals
  `DiffusionPipeline.from_pretrained(repo)(prompt, latents=pack(X0), ..., output_type="latent")` unpacked;
- the velocity mapping: v_ours(x, t) = -transformer(pack(x), timestep = sigma = 1 - t) unpacked, and a scheduler
  step is our Euler step; the guidance value is an input of dev's transformer only; a student initialised from the
  teacher is the teacher's own flow (its 1-RF): our Euler on the teacher's velocity = `teacher_sample("euler")` =
  FluxPipeline with FlowMatchEuler on the uniform grid without shift;
- the saved student is a FluxPipeline folder whose one diffusers step is our one step (dev at guidance 3.5).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from instaflow_core.errors import ConfigError
from instaflow_core.generation.solvers import flow_latents, teacher_latents
from instaflow_core.inference.generate import flow_images
from instaflow_core.models.family import family_of
from instaflow_core.models.flux import DEFAULT_GUIDANCE, image_ids, pack, unpack
from instaflow_core.models.loading import load_source, model_geometry
from instaflow_core.rectified_flow import interpolate, noise_from_seeds

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of a cat", "a red car on a street"]
SEEDS = [3, 7]
RES = 64  # px: 8x8 latents, 4x4 tokens
SHAPE = (16, 8, 8)
T5_TOKENS = {"dev": 512, "schnell": 256}


def _pipe(folder: Path):  # noqa: ANN202 - diffusers' pipeline
    """diffusers' own loading in float32 (the repos' text encoder configs name bfloat16, which transformers 5
    honours unless told otherwise)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(pipe, variant: str, steps: int, guidance: float, **kw) -> torch.Tensor:  # noqa: ANN001
    """The pipeline's latents from our X0 packed (its first sigma is 1: the noise is used as given), unpacked."""
    x0 = noise_from_seeds(SEEDS, SHAPE)
    with torch.no_grad():
        out = pipe(
            PROMPTS, latents=pack(x0), num_inference_steps=steps, guidance_scale=guidance, height=RES, width=RES,
            max_sequence_length=T5_TOKENS[variant], output_type="latent", **kw,
        )  # fmt: skip
    assert out.images.shape == (2, 16, 64)  # packed: (B, h/2 * w/2, 16 * 4)
    return unpack(out.images, *SHAPE[1:])


@pytest.fixture(scope="module", params=["dev", "schnell"])
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(variant: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"flux_{variant}_folder")


@pytest.fixture(scope="module")
def model(folder: Path):  # noqa: ANN201
    return load_source(folder)


def test_flux_folders_load_as_the_flux_family(model, folder: Path, variant: str) -> None:  # noqa: ANN001
    assert family_of(folder).name == "flux" and model.family.name == "flux"
    assert type(model.denoiser).__name__ == "FluxTransformer2DModel"
    assert model.denoiser.config.guidance_embeds == (variant == "dev")
    assert model.family.vae_factors(model.vae) == (0.3611, 0.1159)
    assert model.latent_shape(RES) == SHAPE  # unpacked: 16 channels, not 64 token features
    assert model.family.guidance_kind({"transformer": dict(model.denoiser.config)}) == (
        "embedded" if variant == "dev" else "none"
    )


def test_conditions_equal_the_pipelines_encode_prompt(model, folder: Path, variant: str) -> None:  # noqa: ANN001
    cond = model.encode(PROMPTS)
    with torch.no_grad():
        embeds, pooled, text_ids = _pipe(folder).encode_prompt(
            PROMPTS, None, max_sequence_length=T5_TOKENS[variant]
        )
    t5_width, clip_width = model["text_encoder_2"].config.d_model, model["text_encoder"].config.hidden_size
    assert cond.embeds.shape == (2, T5_TOKENS[variant], t5_width) and cond.pooled.shape == (2, clip_width)
    assert cond.mask is None and cond.extra == {}  # guidance is not a property of the prompt
    diffs = [(cond.embeds - embeds).abs().max().item(), (cond.pooled - pooled).abs().max().item()]
    print(f"{variant}: condition max abs differences {diffs}")
    assert max(diffs) == 0.0
    assert text_ids.shape == (T5_TOKENS[variant], 3) and not text_ids.any()  # the text ids we pass: zeros


def test_packing_is_the_pipelines() -> None:
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 12)
    tokens = pack(x)
    assert tokens.shape == (2, 4 * 6, 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 16, 8, 12))
    assert torch.equal(unpack(tokens, 8, 12), x)
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 64, 96, 8), x)
    assert torch.equal(
        image_ids(8, 12), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    )


@pytest.mark.parametrize(("steps", "guidance"), [(3, 3.5), (2, 5.0)])
def test_teacher_triplets_equal_the_pipeline(
    model, folder: Path, variant: str, steps: int, guidance: float
) -> None:  # noqa: ANN001
    """Parity: generation's teacher_latents (flow-euler: FluxPipeline's sigmas, mu for dev) vs FluxPipeline."""
    if variant == "schnell":
        guidance = 1.0  # schnell has no guidance (a larger value is a ConfigError: below)
    pipe = _pipe(folder)
    ours = teacher_latents(
        model, PROMPTS, SEEDS, steps=steps, guidance=guidance, scheduler="flow-euler", resolution=RES
    )
    theirs = _theirs(pipe, variant, steps, guidance)
    diff = (ours - theirs).abs().max().item()
    print(
        f"{variant} steps={steps} guidance={guidance}: max abs difference {diff:.3g} (|x1| <= {theirs.abs().max():.3g})"
    )
    assert ours.shape == (2, *SHAPE) and diff < 1e-5
    if variant == "dev":  # the guidance value reaches the transformer: another value, other latents
        other = _theirs(pipe, variant, steps, guidance + 1.0)
        assert (other - theirs).abs().max() > 1e-3
        shift = pipe.scheduler.sigmas[1].item()
        assert abs(shift - (1 - 1 / steps)) > 1e-3  # the grid is shifted (mu): the comparison covers it
    else:
        with pytest.raises(ConfigError, match="no guidance embedding"):
            teacher_latents(
                model, PROMPTS, SEEDS, steps=1, guidance=2.0, scheduler="flow-euler", resolution=RES
            )


def test_the_velocity_is_minus_the_transformer_output_at_sigma(model, variant: str) -> None:  # noqa: ANN001
    """v_ours(x, t) = -unpack(transformer(pack(x), sigma = 1 - t)); the scheduler's path is our interpolation and
    its step our Euler; the guidance value is an input of dev's transformer (default 3.5), never of schnell's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, *SHAPE, generator=gen), torch.randn(2, *SHAPE, generator=gen)
    t = torch.tensor([0.25, 0.7])
    cond = model.encode(PROMPTS)
    x_t = interpolate(x0, x1, t)
    net = model.denoiser
    guidance = torch.full((2,), DEFAULT_GUIDANCE) if variant == "dev" else None
    with torch.no_grad():
        v = model.velocity()(x_t, t, cond)
        theirs = net(
            hidden_states=pack(x_t), timestep=1 - t, guidance=guidance, pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds, txt_ids=torch.zeros(cond.embeds.shape[1], 3),
            img_ids=image_ids(8, 8), return_dict=False,
        )[0]  # fmt: skip
        guided, weight = model.family.with_guidance(cond, 6.0)
        v6 = model.velocity()(x_t, t, guided)
    assert v.shape == x_t.shape and torch.equal(v, -unpack(theirs, 8, 8))
    assert weight == 1.0 and guided.extra["guidance"].tolist() == [6.0, 6.0]  # no classifier-free pass
    assert model.family.with_guidance(cond, 1.0) == (cond, 1.0)  # "no guidance": the condition's own (3.5)
    if variant == "dev":
        assert (v6 - v).abs().max() > 1e-4
    else:
        assert torch.equal(v6, v)  # schnell's transformer has no guidance input
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=[0.75, 0.3])  # sigma = 1 - t
    noisy = sched.scale_noise(x1, sched.timesteps, x0)  # sigma * noise + (1 - sigma) * image
    assert torch.allclose(noisy, x_t, atol=1e-6)
    step = sched.step(-v[:1], sched.timesteps[0], x_t[:1], return_dict=False)[0]  # sigma 0.75 -> 0.3
    assert torch.allclose(step, x_t[:1] + (0.7 - 0.25) * v[:1], atol=1e-6)


def test_a_student_from_the_teacher_starts_as_the_teachers_own_flow(
    model,
    folder: Path,
    variant: str,  # noqa: ANN001
) -> None:
    """Our Euler on model.velocity() (what a student initialised from the teacher samples) = the teacher's sampler
    `euler` = FluxPipeline with FlowMatchEuler without shift on the uniform grid sigma_i = 1 - i/N."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, guidance = 3, (2.0 if variant == "dev" else 1.0)
    ours = flow_latents(model, PROMPTS, SEEDS, steps=steps, guidance=guidance, resolution=RES)
    sampler = teacher_latents(
        model, PROMPTS, SEEDS, steps=steps, guidance=guidance, scheduler="euler", resolution=RES
    )
    pipe = _pipe(folder)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False
    )
    theirs = _theirs(pipe, variant, steps, guidance, sigmas=[1.0, 2 / 3, 1 / 3])
    diffs = [(ours - sampler).abs().max().item(), (ours - theirs).abs().max().item()]
    print(f"{variant} 1-RF: euler_sample vs teacher 'euler' vs FlowMatchEuler(no shift): {diffs}")
    assert max(diffs) < 1e-5
    if variant == "dev":
        shifted = teacher_latents(
            model, PROMPTS, SEEDS, steps=steps, guidance=guidance, scheduler="flow-euler", resolution=RES
        )
        assert (shifted - ours).abs().max() > 1e-3  # mu shifts dev's grid: the comparison is not vacuous


def test_the_saved_student_is_one_diffusers_step(model, folder: Path, variant: str, tmp_path: Path) -> None:  # noqa: ANN001
    """save_student -> a FluxPipeline folder (the scheduler kept, transformer written whole, no root checkpoint, no
    fp16 variant); `DiffusionPipeline.from_pretrained(folder)(..., num_inference_steps=1)` (guidance 3.5 for dev:
    what a one-step student is trained and sampled at) is our one step, latents and decoded images alike."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    net = copy.deepcopy(model.denoiser)
    with torch.no_grad():  # a "trained" student: weights of its own
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out = model.family.save_student(folder, net, tmp_path / "student", {"kind": "instaflow"}, sample_size=8)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not [f for f in files if ".fp16." in f]
    assert [f for f in files if "/" not in f] == [
        "instaflow.json",
        "model_index.json",
    ]  # no flux1-*.safetensors
    assert {f.split("/")[0] for f in files if "/" in f} == {
        "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae",
    }  # fmt: skip
    base_files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {
        f for f in files if f.startswith("text_encoder_2/")
    } <= base_files  # T5's shards copied as they are
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"] == [
        "diffusers",
        "FluxTransformer2DModel",
    ]

    pipe = _pipe(out)
    assert isinstance(pipe, FluxPipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.use_dynamic_shifting == (variant == "dev")
    student = load_source(out)
    assert student.family.name == "flux"
    pipeline_guidance = (
        DEFAULT_GUIDANCE if variant == "dev" else 0.0
    )  # schnell's model card: guidance_scale=0
    ours = flow_latents(student, PROMPTS, SEEDS, steps=1, guidance=1.0, resolution=RES)
    theirs = _theirs(pipe, variant, 1, pipeline_guidance)
    diff = (ours - theirs).abs().max().item()
    print(f"{variant} one step: max abs difference {diff:.3g}")
    assert diff < 1e-5
    if variant == "dev":  # a guidance setting above 1 is the embedded value, as the pipeline's guidance_scale
        diff5 = (
            (
                flow_latents(student, PROMPTS, SEEDS, steps=1, guidance=5.0, resolution=RES)
                - _theirs(pipe, variant, 1, 5.0)
            )
            .abs()
            .max()
        )
        assert diff5 < 1e-5
    images = flow_images(student, PROMPTS, SEEDS, steps=1, resolution=RES)
    with torch.no_grad():
        np_images = pipe(
            PROMPTS, latents=pack(noise_from_seeds(SEEDS, SHAPE)), num_inference_steps=1,
            guidance_scale=pipeline_guidance, height=RES, width=RES, max_sequence_length=T5_TOKENS[variant],
            output_type="np",
        ).images  # fmt: skip
    theirs_u8 = (np_images * 255).round().astype(np.uint8)
    assert images.shape == (2, RES, RES, 3)
    assert np.abs(images.astype(int) - theirs_u8.astype(int)).max() <= 1


def test_geometry_and_the_resolutions_the_model_takes(flux_dev_folder: Path) -> None:
    g = model_geometry(str(flux_dev_folder))
    assert g.latent_shape() == (16, 8, 8) and g.native_resolution == 64  # the VAE's sample_size (real: 1024)
    assert g.latent_shape(RES) == SHAPE and g.latent_shape(1024) == (16, 128, 128)
    problem = g.problem(72, "generation.resolution")
    assert problem.startswith("generation.resolution=72: must be a multiple of 16 px")
    assert problem.endswith("e.g. 64 (native 64)")
    assert "VAE factor 8 x 2x2 token packing 2" in problem
    assert "2x2 token packing by 2" in g.latent_problem((16, 9, 9))
    assert "channels" in g.latent_problem((64, 8, 8))  # the packed token width is not a latent shape


def test_a_single_bfl_file_is_the_repos_teacher(
    folder: Path, variant: str, teacher_hub: Path, tmp_path: Path
) -> None:
    """`models.teacher=flux1-dev.safetensors` (BFL keys, the transformer only, as the real file): the family from
    its keys, the VAE / text encoders / scheduler from the cached repo diffusers infers; the same teacher as the
    folder, and its conversion into a FluxPipeline folder (what the teacher stage stores) too."""
    from safetensors.torch import save_file

    from instaflow_core.errors import DataError
    from instaflow_core.models.flux import single_file_repo
    from tests.support import teacher_repos as tr

    name = tr.FLUX_DEV_SINGLE_FILE if variant == "dev" else tr.FLUX_SCHNELL_SINGLE_FILE
    ref = load_source(folder)
    width = ref.denoiser.config.num_attention_heads * ref.denoiser.config.attention_head_dim
    assert single_file_repo(folder / name) == (tr.FLUX_DEV if variant == "dev" else tr.FLUX_SCHNELL)
    with tr.flux_single_file_width(width):  # diffusers 0.42.1 hardcodes FLUX.1's 3072 (tests/support)
        single = load_source(folder / name)
    assert single.family.name == "flux" and single.folder is None
    ours, theirs = single.denoiser.state_dict(), ref.denoiser.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    guidance = 3.5 if variant == "dev" else 1.0
    args = dict(steps=2, guidance=guidance, scheduler="flow-euler", resolution=RES)
    x1 = teacher_latents(ref, PROMPTS, SEEDS, **args)
    assert torch.equal(teacher_latents(single, PROMPTS, SEEDS, **args), x1)
    converted = load_source(single.save(tmp_path / "teacher"))
    assert family_of(tmp_path / "teacher").name == "flux"
    assert torch.equal(teacher_latents(converted, PROMPTS, SEEDS, **args), x1)
    fill = tmp_path / "flux1-fill-dev.safetensors"  # a FLUX.1 Fill transformer: 384 features per image token
    save_file(
        {"img_in.weight": torch.zeros(8, 384), "guidance_in.in_layer.weight": torch.zeros(2, 2)}, str(fill)
    )
    with pytest.raises(DataError, match="384 input features per token"):
        single_file_repo(fill)


def test_onnx_export_refuses_a_flux_model_in_one_line(model, tmp_path: Path) -> None:  # noqa: ANN001
    """The exporter writes one text encoder's graph; FLUX conditions on T5 and CLIP's pooled output: a one-line
    refusal naming the family, nothing written. (The one-step transformer graph itself exports with the
    exporter's `_export_graph` at this size; T5-XXL and a 12B transformer in fp32 ONNX are another matter.)"""
    from instaflow_core.errors import DataError
    from instaflow_core.inference.onnx_export import export_onnx

    with pytest.raises(DataError) as err:
        export_onnx(model, tmp_path / "onnx")
    assert "\n" not in str(err.value) and "a flux model" in str(err.value)
    assert not (tmp_path / "onnx").exists()
