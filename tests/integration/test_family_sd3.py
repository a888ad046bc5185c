"""The sd3 family (SD 3.x, instaflow_core/models/sd3.py) against diffusers' own StableDiffusion3Pipeline, on the
SD 3.5 Medium-shaped repo (tests/support/teacher_repos.py: patch 2, dual attention, qk RMS-norm, two CLIPs + a
sharded T5, shift 3.0, bf16 / fp16 weights as the hub's), and the same repo without T5, float32 on a CPU:

- conditions: our Condition is the pipeline's `encode_prompt` (with T5, and with zeros in its place without it);
- triplets: `generation.solvers.teacher_latents` (our noise from seeds, our conditions, our latent layout) equals
  `DiffusionPipeline.from_pretrained(repo)(prompt, latents=X0, ..., output_type="latent")`;
- the velocity mapping: v_ours(x, t) = -transformer(x, sigma * 1000) at sigma = 1 - t, and a scheduler step is our
  Euler step; a student initialised from the teacher is the teacher's own flow (its 1-RF): our Euler on the
  teacher's velocity = `teacher_sample("euler")` = FlowMatchEuler at shift 1 on the uniform grid;
- the saved student is a StableDiffusion3Pipeline folder whose one diffusers step is our one step, exactly.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from instaflow_core.errors import DataError
from instaflow_core.generation.solvers import flow_latents, teacher_latents
from instaflow_core.inference.generate import flow_images
from instaflow_core.models.family import family_of
from instaflow_core.models.loading import load_source, model_geometry
from instaflow_core.rectified_flow import interpolate, noise_from_seeds

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of a cat", "a red car on a street"]
SEEDS = [3, 7]
RES = 64  # px: 8x8 latents, 4x4 patches
SHAPE = (16, 8, 8)


def _pipe(folder: Path):  # noqa: ANN202 - diffusers' pipeline
    """diffusers' own loading, in float32 (without `dtype` each network loads in the dtype its config names:
    the repo's fp16 text encoders beside float32 ones); a folder without T5 needs `text_encoder_3=None,
    tokenizer_3=None` there (diffusers refuses a null entry of a non-optional component), as its docs load SD3
    without T5."""
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    no_t5 = {k: None for k in ("text_encoder_3", "tokenizer_3") if index.get(k) == [None, None]}
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **no_t5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(pipe, steps: int, guidance: float, **kw) -> torch.Tensor:  # noqa: ANN001
    """The pipeline's latents from our X0 (its initial sigma is 1: the noise is used as given)."""
    x0 = noise_from_seeds(SEEDS, SHAPE)
    with torch.no_grad():
        out = pipe(
            PROMPTS, latents=x0, num_inference_steps=steps, guidance_scale=guidance, height=RES, width=RES,
            output_type="latent", **kw,
        )  # fmt: skip
    return out.images


def _config(folder: Path, component: str) -> dict:
    return json.loads((folder / component / "config.json").read_text())


@pytest.fixture(scope="module", params=["t5", "no-t5"])
def folder(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("sd3_repo" if request.param == "t5" else "sd3_repo_no_t5")


@pytest.fixture(scope="module")
def model(sd3_repo: Path):  # noqa: ANN201
    return load_source(sd3_repo)


def test_sd3_folders_load_as_the_sd3_family(sd3_repo: Path, sd3_repo_no_t5: Path) -> None:
    assert family_of(sd3_repo).name == "sd3"
    with_t5, without = load_source(sd3_repo), load_source(sd3_repo_no_t5)
    assert {"text_encoder_3", "tokenizer_3"} <= set(with_t5.parts)
    assert not {"text_encoder_3", "tokenizer_3"} & set(without.parts)
    cfg = with_t5.denoiser.config
    assert type(with_t5.denoiser).__name__ == "SD3Transformer2DModel"
    assert cfg.patch_size == 2 and list(cfg.dual_attention_layers) and cfg.qk_norm == "rms_norm"
    assert with_t5.family.vae_factors(with_t5.vae) == (1.5305, 0.0609)
    assert with_t5.latent_shape(RES) == SHAPE


def test_conditions_equal_the_pipelines_encode_prompt(folder: Path) -> None:
    model, pipe = load_source(folder), _pipe(folder)
    cond, uncond = model.encode(PROMPTS), model.negative(["", ""])
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True
        )
    clip_l, clip_g = (_config(folder, c)["projection_dim"] for c in ("text_encoder", "text_encoder_2"))
    width = _config(folder, "transformer")["joint_attention_dim"]  # T5's d_model
    assert cond.embeds.shape == (2, 77 + 256, width) and cond.pooled.shape == (2, clip_l + clip_g)
    assert cond.mask is None and cond.extra == {}
    diffs = [
        (a - b).abs().max().item()
        for a, b in (
            (cond.embeds, embeds),
            (cond.pooled, pooled),
            (uncond.embeds, neg),
            (uncond.pooled, neg_pooled),
        )
    ]
    print(f"{folder.name}: condition max abs differences {diffs}")
    assert max(diffs) == 0.0
    assert cond.embeds[:, :77, clip_l + clip_g :].abs().max() == 0  # CLIP states zero-padded to T5's width
    assert cond.embeds[:, :77, : clip_l + clip_g].abs().min(dim=-1).values.max() > 0
    t5_part = cond.embeds[:, 77:].abs().max()
    assert (t5_part == 0) if folder.name == "sd35-no-t5" else (t5_part > 0)


@pytest.mark.parametrize(("steps", "guidance"), [(4, 4.5), (3, 1.0)])
def test_teacher_triplets_equal_the_pipeline(folder: Path, steps: int, guidance: float) -> None:
    """Parity: generation's teacher_latents (flow-euler, the repo's shift 3.0) vs StableDiffusion3Pipeline."""
    model, pipe = load_source(folder), _pipe(folder)
    ours = teacher_latents(
        model, PROMPTS, SEEDS, steps=steps, guidance=guidance, scheduler="flow-euler", resolution=RES
    )
    theirs = _theirs(pipe, steps, guidance)
    diff = (ours - theirs).abs().max().item()
    print(
        f"{folder.name} steps={steps} guidance={guidance}: max abs difference {diff:.3g} (|x1| <= {theirs.abs().max():.3g})"
    )
    assert ours.shape == (2, *SHAPE) and diff < 1e-5
    two_forwards = teacher_latents(
        model, PROMPTS, SEEDS, steps=steps, guidance=guidance, scheduler="flow-euler", resolution=RES,
        cfg_batched=False,
    )  # fmt: skip
    assert (two_forwards - theirs).abs().max() < 1e-5


def test_the_velocity_is_minus_the_transformer_output_at_sigma(model) -> None:  # noqa: ANN001
    """v_ours(x, t) = -v_theirs(x, sigma = 1 - t); the scheduler's path is our interpolation, its step our Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, *SHAPE, generator=gen), torch.randn(2, *SHAPE, generator=gen)
    t = torch.tensor([0.25, 0.7])
    cond = model.encode(PROMPTS)
    x_t = interpolate(x0, x1, t)
    with torch.no_grad():
        v = model.velocity()(x_t, t, cond)
        theirs = model.denoiser(
            hidden_states=x_t, timestep=(1 - t) * 1000, encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled, return_dict=False,
        )[0]  # fmt: skip
    assert torch.equal(v, -theirs)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=[0.75, 0.3])  # sigma = 1 - t
    noisy = sched.scale_noise(x1, sched.timesteps, x0)  # sigma * noise + (1 - sigma) * image
    assert torch.allclose(noisy, x_t, atol=1e-6)
    step = sched.step(theirs[:1], sched.timesteps[0], x_t[:1], return_dict=False)[0]  # sigma 0.75 -> 0.3
    assert torch.allclose(step, x_t[:1] + (0.7 - 0.25) * v[:1], atol=1e-6)


def test_a_student_from_the_teacher_starts_as_the_teachers_own_flow(model, sd3_repo: Path) -> None:  # noqa: ANN001
    """Our Euler on model.velocity() (what a student initialised from the teacher samples) = the teacher's
    sampler `euler` = FlowMatchEulerDiscreteScheduler at shift 1 on the uniform grid sigma_i = 1 - i/N."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, guidance = 3, 2.0
    ours = flow_latents(model, PROMPTS, SEEDS, steps=steps, guidance=guidance, resolution=RES)
    sampler = teacher_latents(
        model, PROMPTS, SEEDS, steps=steps, guidance=guidance, scheduler="euler", resolution=RES
    )
    pipe = _pipe(sd3_repo)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    theirs = _theirs(pipe, steps, guidance, sigmas=[1.0, 2 / 3, 1 / 3])
    diffs = [(ours - sampler).abs().max().item(), (ours - theirs).abs().max().item()]
    print(f"1-RF: euler_sample vs teacher 'euler' vs FlowMatchEuler(shift 1): {diffs}")
    assert max(diffs) < 1e-5
    shifted = teacher_latents(
        model, PROMPTS, SEEDS, steps=steps, guidance=guidance, scheduler="flow-euler", resolution=RES
    )
    assert (shifted - ours).abs().max() > 1e-3  # shift 3 is another grid: the comparison is not vacuous


def test_the_saved_student_is_one_diffusers_step(model, sd3_repo: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """save_student -> a StableDiffusion3Pipeline folder (FlowMatchEuler kept, no fp16 variant, no root file);
    `DiffusionPipeline.from_pretrained(folder)(..., num_inference_steps=1)` is our one step (the shifted grid of
    one step is [1, 0]), latents and decoded images alike, with and without guidance."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    net = copy.deepcopy(model.denoiser)
    with torch.no_grad():  # a "trained" student: weights of its own
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out = model.family.save_student(sd3_repo, net, tmp_path / "student", {"kind": "instaflow"}, sample_size=8)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not [f for f in files if ".fp16." in f]
    assert [f for f in files if "/" not in f] == ["instaflow.json", "model_index.json"]
    assert {f.split("/")[0] for f in files if "/" in f} == {
        "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
        "transformer", "vae",
    }  # fmt: skip
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert json.loads((out / "transformer" / "config.json").read_text())["sample_size"] == 8

    pipe = _pipe(out)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    student = load_source(out)
    assert student.family.name == "sd3"
    for guidance in (1.0, 1.5):
        ours = flow_latents(student, PROMPTS, SEEDS, steps=1, guidance=guidance, resolution=RES)
        theirs = _theirs(pipe, 1, guidance)
        diff = (ours - theirs).abs().max().item()
        print(f"one step, guidance {guidance}: max abs difference {diff:.3g}")
        assert diff < 1e-5
    images = flow_images(student, PROMPTS, SEEDS, steps=1, resolution=RES)
    with torch.no_grad():
        np_images = pipe(
            PROMPTS, latents=noise_from_seeds(SEEDS, SHAPE), num_inference_steps=1, guidance_scale=1.0, height=RES,
            width=RES, output_type="np",
        ).images  # fmt: skip
    theirs_u8 = (np_images * 255).round().astype(np.uint8)
    assert images.shape == (2, RES, RES, 3)
    assert np.abs(images.astype(int) - theirs_u8.astype(int)).max() <= 1


def test_geometry_and_the_resolutions_the_model_takes(sd3_repo: Path) -> None:
    g = model_geometry(str(sd3_repo))
    assert g.latent_shape() == SHAPE and g.native_resolution == RES  # sample_size 8 (SD 3.5: 128, 1024 px)
    assert g.latent_shape(256) == (16, 32, 32) and g.latent_shape(384) == (16, 48, 48)
    assert "multiple of 16 px" in g.problem(72, "generation.resolution")
    # pos_embed_max_size 24 patches of 2 (SD 3.5: 384, 6144 px)
    assert "larger than this model takes (384 px at most" in g.problem(400, "generation.resolution")
    assert "transformer patching by 2" in g.latent_problem((16, 9, 9))
    assert "16 channels" not in (g.latent_problem((4, 8, 8)) or "") and "channels" in g.latent_problem(
        (4, 8, 8)
    )


def test_save_and_from_configs_keep_the_architecture(folder: Path, tmp_path: Path) -> None:
    """`save` (what a converted single-file teacher becomes) writes a folder that loads back with the same
    weights; `from_configs` builds the same architecture with random weights (T5 skipped on request)."""
    model = load_source(folder)
    saved = load_source(model.save(tmp_path / "saved"))
    assert sorted(saved.parts) == sorted(model.parts)
    for name, part in model.modules().items():
        other = saved.modules()[name].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in part.state_dict().items()), name
    assert saved.encode(PROMPTS).embeds.equal(model.encode(PROMPTS).embeds)
    fresh = model.family.from_configs(folder, skip=("text_encoder_3",))
    assert "text_encoder_3" not in fresh.parts and fresh.geometry() == model.geometry()
    same = {k: v for k, v in model.denoiser.config.items() if not k.startswith("_")}
    assert {k: v for k, v in fresh.denoiser.config.items() if not k.startswith("_")} == same


def test_a_dynamically_shifted_scheduler_matches_the_pipeline_too(sd3_repo: Path) -> None:
    """A scheduler config with `use_dynamic_shifting` (mu from the image's token count, as SD 3.5 fine-tunes
    may ship): the family computes mu as StableDiffusion3Pipeline does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, pipe = load_source(sd3_repo), _pipe(sd3_repo)
    dynamic = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64
    )
    model.parts["scheduler"] = pipe.scheduler = dynamic
    ours = teacher_latents(
        model, PROMPTS, SEEDS, steps=3, guidance=3.0, scheduler="flow-euler", resolution=RES
    )
    diff = (ours - _theirs(pipe, 3, 3.0)).abs().max().item()
    print(f"dynamic shifting: max abs difference {diff:.3g}")
    assert diff < 1e-5


def test_the_single_file_checkpoint_loads_with_the_repos_text_encoders(
    sd3_repo: Path, sd3_repo_no_t5: Path, sd3_hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sd3.5_medium.safetensors` holds the MMDiT and the VAE only (as the released file): the family takes the
    text encoders from the config repo (the cached hub snapshot diffusers' inference names), T5 only where it is
    there, and says in one line what to download when a CLIP is missing."""
    from diffusers.loaders import single_file_utils

    from tests.support.teacher_repos import SD35_SINGLE_FILE

    file = sd3_repo / SD35_SINGLE_FILE
    folder = load_source(sd3_repo)
    # the tiny file's shapes are not SD 3.5's, which diffusers' inference reads: name what it infers for the real one
    monkeypatch.setattr(single_file_utils, "infer_diffusers_model_type", lambda checkpoint: "sd35_medium")
    monkeypatch.setattr(
        single_file_utils,
        "fetch_diffusers_config",
        lambda checkpoint: {"pretrained_model_name_or_path": sd3_hub},
    )
    single = load_source(file)  # loading.SINGLE_FILE_FAMILIES: sd35_medium -> sd3
    assert single.family.name == "sd3" and sorted(single.parts) == sorted(folder.parts)
    for name, net in folder.modules().items():
        theirs = single.modules()[name].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in net.state_dict().items()), name
    assert teacher_latents(single, PROMPTS, SEEDS, steps=2, guidance=4.5, scheduler="flow-euler").equal(
        teacher_latents(folder, PROMPTS, SEEDS, steps=2, guidance=4.5, scheduler="flow-euler")
    )
    family = folder.family
    no_t5 = family.load_single_file(file, config=str(sd3_repo_no_t5), local_files_only=True, dtype="float32")
    assert "text_encoder_3" not in no_t5.parts and "text_encoder" in no_t5.parts
    configs_only = tmp_path / "configs"
    shutil.copytree(sd3_repo, configs_only, ignore=shutil.ignore_patterns("*.safetensors", "text_encoders"))
    with pytest.raises(DataError) as err:
        family.load_single_file(file, config=str(configs_only), local_files_only=True, dtype="float32")
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(
        f"{SD35_SINGLE_FILE} holds no text_encoder and {configs_only}/text_encoder/"
    )
