"""The SDXL family (instaflow_core/models/sdxl.py) on the SDXL base 1.0-shaped repo (tests/support/teacher_repos.py):

- parity: our triplet latents (`generation.solvers.teacher_latents`: our noise from seeds, our conditions, our
  latent layout) equal `DiffusionPipeline.from_pretrained(<hub id>)(prompt, latents=X0, output_type="latent")`
  for the repo's Euler scheduler, DPM-Solver++ and DDIM, fp32, with an empty and a given negative prompt;
- the conditions equal StableDiffusionXLPipeline.encode_prompt's tensors (zeros for the empty negative);
- the velocity mapping: unet(x, tau = (1 - t) * 1000, added_cond_kwargs = pooled + (H, W, 0, 0, H, W));
- a saved student folder loads in diffusers' own StableDiffusionXLPipeline with the project's
  RectifiedFlowEulerScheduler and reproduces `inference.generate.flow_images` (one step; two with guidance);
- the root single file `sd_xl_base_1.0.safetensors` (SGM keys) loads as an SDXL model;
- the float16 VAE decodes in float32; ONNX export refuses in one line; the preflight's rules for the family.

diffusers' pipeline modules get `requires_grad_(False)`, as ours have: torch picks other CPU kernels for parameters
that require grad (last-bit differences, even under no_grad), and a random UNet under guidance amplifies them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from instaflow_core.errors import DataError
from instaflow_core.generation.solvers import teacher_latents
from instaflow_core.inference.generate import flow_images, flow_latents_from
from instaflow_core.models.family import Condition, family_of
from instaflow_core.models.flow_scheduler import RectifiedFlowEulerScheduler
from instaflow_core.models.loading import load_source
from instaflow_core.models.sd import make_scheduler
from instaflow_core.models.sdxl import FAMILY as SDXL
from instaflow_core.models.sdxl import size_time_ids
from instaflow_core.rectified_flow import noise_from_seeds
from tests.support.teacher_repos import SDXL as SDXL_REPO
from tests.support.teacher_repos import SDXL_SINGLE_FILE

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
def sdxl_hub(teacher_hub: Path) -> str:
    """The repo's hub id, resolved from the offline cache of the teacher repos."""
    return SDXL_REPO


@pytest.fixture(scope="module")
def teacher(sdxl_folder: Path):
    return load_source(sdxl_folder)


# -------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("scheduler", ["euler", "dpmsolver++", "ddim"])
def test_teacher_latents_equal_diffusers_sdxl_pipeline(scheduler: str, sdxl_hub: str) -> None:
    model = load_source(sdxl_hub)
    assert model.family is SDXL and type(model.scheduler).__name__ == "EulerDiscreteScheduler"
    steps, guidance = 4, 5.0
    ours = teacher_latents(
        model, PROMPTS, SEEDS, steps=steps, guidance=guidance, scheduler=scheduler, resolution=RES
    )
    pipe = _pipe(sdxl_hub, scheduler)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    x0 = noise_from_seeds(SEEDS, (4, RES // 8, RES // 8))  # the pipeline's layout is ours: (B, 4, h, w)
    theirs = pipe(
        PROMPTS, latents=x0, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
        height=RES, width=RES,
    ).images  # fmt: skip
    diff = (ours - theirs).abs().max().item()
    print(f"sdxl {scheduler}: max abs diff {diff:.3g} (|x1| max {theirs.abs().max().item():.3g})")
    assert ours.shape == theirs.shape == (2, 4, 8, 8)
    assert diff < 1e-4


def test_teacher_latents_with_a_negative_prompt_equal_diffusers(teacher, sdxl_folder: Path) -> None:
    ours = teacher_latents(
        teacher, PROMPTS, SEEDS, steps=3, guidance=6.0, scheduler="euler", negative_prompt="blurry, low quality",
        resolution=RES,
    )  # fmt: skip
    pipe = _pipe(sdxl_folder)
    theirs = pipe(
        PROMPTS, negative_prompt=["blurry, low quality"] * 2, latents=noise_from_seeds(SEEDS, (4, 8, 8)),
        num_inference_steps=3, guidance_scale=6.0, output_type="latent", height=RES, width=RES,
    ).images  # fmt: skip
    diff = (ours - theirs).abs().max().item()
    print(f"sdxl euler, negative prompt: max abs diff {diff:.3g}")
    assert diff < 1e-4


def test_two_forward_guidance_and_bf16_autocast(teacher) -> None:
    """cfg_batched=false (uncond and cond as two forwards) is the doubled batch; bf16 autocast runs close to it."""
    kw = dict(steps=2, guidance=5.0, scheduler="euler", resolution=RES)
    batched = teacher_latents(teacher, PROMPTS, SEEDS, **kw)
    two = teacher_latents(teacher, PROMPTS, SEEDS, cfg_batched=False, **kw)
    bf16 = teacher_latents(teacher, PROMPTS, SEEDS, mixed_precision="bf16", **kw)
    assert (batched - two).abs().max().item() < 1e-4
    assert (
        bf16.dtype == torch.float32 and (batched - bf16).abs().max().item() < 0.1 * batched.abs().max().item()
    )


def test_conditions_are_the_pipelines_prompt_embeddings(teacher, sdxl_folder: Path) -> None:
    pipe = _pipe(sdxl_folder)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True
    )
    cond = teacher.encode(PROMPTS)
    assert cond.embeds.shape == (2, 77, 32 + 64) and cond.pooled.shape == (2, 64)  # type: ignore[union-attr]
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.pooled, pooled)
    uncond = teacher.negative(["", ""])  # force_zeros_for_empty_prompt: zeros, as diffusers with no negative
    assert torch.equal(uncond.embeds, neg) and torch.equal(uncond.pooled, neg_pooled)
    assert not uncond.embeds.any() and not uncond.pooled.any()  # type: ignore[union-attr]
    given = teacher.negative(["blurry", ""])  # row by row: a given negative prompt is encoded
    assert torch.equal(given.embeds[0], teacher.encode(["blurry"]).embeds[0]) and not given.embeds[1].any()
    teacher.parts["force_zeros_for_empty_prompt"] = False
    try:
        assert torch.equal(teacher.negative([""]).embeds, teacher.encode([""]).embeds)
    finally:
        teacher.parts["force_zeros_for_empty_prompt"] = True


# ------------------------------------------------------------------------------------------ velocity
def test_velocity_is_the_unet_at_tau_with_pooled_text_and_size_ids(teacher) -> None:
    unet = teacher.denoiser
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))  # 64 x 96 px
    t = torch.tensor([0.0, 0.25])
    cond = teacher.encode(PROMPTS)
    v = teacher.velocity()(x, t, cond)
    ids = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * 2)
    assert torch.equal(size_time_ids(2, 64, 96), ids)
    expected = unet(
        x, torch.tensor([1000.0, 750.0]), encoder_hidden_states=cond.embeds,
        added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids},
    ).sample  # fmt: skip
    assert torch.allclose(v, expected, atol=1e-6)
    # explicit size / crop conditioning rides in Condition.extra["time_ids"]
    crop = torch.tensor([[1024.0, 1024.0, 16.0, 0.0, 64.0, 96.0]] * 2)
    v_crop = teacher.velocity()(x, t, Condition(cond.embeds, cond.pooled, extra={"time_ids": crop}))
    expected_crop = unet(
        x, torch.tensor([1000.0, 750.0]), encoder_hidden_states=cond.embeds,
        added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": crop},
    ).sample  # fmt: skip
    assert torch.allclose(v_crop, expected_crop, atol=1e-6) and not torch.allclose(v_crop, v)
    with pytest.raises(DataError, match="pooled"):
        teacher.velocity()(x, t, Condition(cond.embeds))


def test_flow_scheduler_is_our_euler() -> None:
    sched = RectifiedFlowEulerScheduler()
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]  # tau_i = (1 - i / N) * 1000
    assert sched.init_noise_sigma == 1.0 and sched.order == 1
    x, v = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    assert torch.equal(sched.scale_model_input(x, sched.timesteps[0]), x)
    assert torch.equal(sched.step(v, sched.timesteps[0], x).prev_sample, x + v / 4)


# ------------------------------------------------------------------------------------------ students
def _saved_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_student_folder_runs_in_diffusers_sdxl_pipeline_as_flow_images(
    teacher, sdxl_folder: Path, tmp_path: Path
) -> None:
    out = SDXL.save_student(
        sdxl_folder, teacher.denoiser, tmp_path / "instaflow", {"kind": "instaflow"}, sample_size=8
    )
    files = _saved_files(out)
    assert not [f for f in files if ".fp16." in f or "/" not in f and f.endswith(".safetensors")]
    assert "scheduler/scheduler_config.json" in files and "text_encoder_2/model.safetensors" in files
    index = json.loads((out / "model_index.json").read_text())
    assert (
        index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    )
    assert index["scheduler"] == ["instaflow_core.models.flow_scheduler", "RectifiedFlowEulerScheduler"]
    student = load_source(out)  # our loader reads the project's scheduler class too
    assert family_of(out) is SDXL and isinstance(student.scheduler, RectifiedFlowEulerScheduler)
    pipe = _pipe(out)  # diffusers' own StableDiffusionXLPipeline, the scheduler from sys.modules
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert isinstance(pipe.scheduler, RectifiedFlowEulerScheduler)
    for steps, guidance in [(1, 1.0), (2, 1.5)]:
        ours = flow_images(student, PROMPTS[:1], SEEDS[:1], steps, guidance)  # native: the recorded 64 px
        gen = torch.Generator().manual_seed(SEEDS[0])  # one CPU generator: the same X0 as noise_from_seeds
        theirs = pipe(PROMPTS[0], num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                      output_type="np").images  # fmt: skip
        theirs8 = (theirs * 255).round().astype(np.uint8)
        img_diff = int(np.abs(ours.astype(int) - theirs8.astype(int)).max())
        x0 = noise_from_seeds(SEEDS[:1], (4, 8, 8))
        lat = flow_latents_from(student, x0, student.encode(PROMPTS[:1]), steps, guidance)
        theirs_lat = pipe(PROMPTS[0], latents=x0, num_inference_steps=steps, guidance_scale=guidance,
                          output_type="latent").images  # fmt: skip
        lat_diff = (lat - theirs_lat).abs().max().item()
        print(f"sdxl student {steps} step(s), w={guidance}: latents {lat_diff:.3g}, uint8 images {img_diff}")
        assert ours.shape == theirs8.shape == (1, 64, 64, 3)
        assert lat_diff < 1e-5 and img_diff <= 1
    with pytest.raises(DataError, match="rectified-flow"):
        teacher_latents(student, PROMPTS[:1], SEEDS[:1], steps=2, guidance=1.0, scheduler="euler")


def test_student_folder_with_variants_and_from_a_hub_snapshot(sdxl_hub: str, tmp_path: Path) -> None:
    from instaflow_core.models.sources import hub_snapshot

    base = hub_snapshot(sdxl_hub)  # symlinks into the cache
    model = load_source(base)
    out = SDXL.save_student(base, model.denoiser, tmp_path / "2rf", {"kind": "2rf"}, variants=True)
    assert not [p for p in out.rglob("*") if p.is_symlink()]
    fp16 = [f for f in _saved_files(out) if ".fp16." in f]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "text_encoder_2/model.fp16.safetensors" in fp16


def test_root_single_file_loads_as_sdxl(teacher, sdxl_folder: Path) -> None:
    """`sd_xl_base_1.0.safetensors` (SGM keys, float16) with the repo's configs: an SDXL model whose UNet and text
    encoders are the folder's (to float16 rounding; its VAE is vae_1_0/, the folder's vae/ is the 0.9 VAE)."""
    single = load_source(sdxl_folder / SDXL_SINGLE_FILE, config=str(sdxl_folder))
    assert single.family is SDXL and single.get("force_zeros_for_empty_prompt") is True
    for name in ("unet", "text_encoder", "text_encoder_2"):
        a, b = single[name].state_dict(), teacher[name].state_dict()
        assert a.keys() == b.keys(), name
        assert max((a[k] - b[k].half().float()).abs().max().item() for k in a) < 1e-6, name
    ours = teacher_latents(single, PROMPTS, SEEDS, steps=2, guidance=5.0, scheduler="euler", resolution=RES)
    assert ours.shape == (2, 4, 8, 8) and torch.isfinite(ours).all()


def test_fp16_vae_decodes_in_float32(sdxl_folder: Path) -> None:
    full = load_source(sdxl_folder)
    half = load_source(sdxl_folder, dtype="float16")
    assert half.vae.config.force_upcast and half.vae.dtype == torch.float16
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 40  # large latents
    img_half = SDXL.decode(half, z)
    assert half.vae.dtype == torch.float16  # cast back after the decode, as diffusers does
    img_full = SDXL.decode(full, z)
    assert torch.isfinite(img_half).all()
    assert (img_half - img_full).abs().max().item() < 2e-2  # only the float16 weights differ


def test_save_round_trip_and_random_weights_from_configs(teacher, sdxl_folder: Path, tmp_path: Path) -> None:
    """`save` (what a converted single-file teacher becomes) writes a StableDiffusionXLPipeline folder that loads
    back with the same weights; `from_configs` builds the same architecture with random weights."""
    folder = SDXL.save(teacher, tmp_path / "teacher")
    index = json.loads((folder / "model_index.json").read_text())
    assert (
        index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    )
    again = load_source(folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = teacher[name].state_dict(), again[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.equal(again.encode(PROMPTS).embeds, teacher.encode(PROMPTS).embeds)
    fresh = SDXL.from_configs(sdxl_folder)
    assert type(fresh["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert fresh.latent_shape() == (4, 8, 8)  # the repo's native 64 px
    assert fresh.get("force_zeros_for_empty_prompt") is True


def test_pipeline_shares_the_models_modules(teacher) -> None:
    pipe = SDXL.pipeline(teacher)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.unet is teacher.denoiser and pipe.text_encoder_2 is teacher["text_encoder_2"]


def test_a_dropped_caption_trains_the_zero_unconditional_input(teacher) -> None:
    from instaflow_core.training.student import ConditionCache

    cond = ConditionCache(teacher)(["", PROMPTS[0], ""])
    assert not cond.embeds[0].any() and not cond.pooled[0].any()  # type: ignore[index]
    assert torch.equal(cond.embeds[1], teacher.encode(PROMPTS[:1]).embeds[0])
    assert torch.equal(cond.embeds[2], cond.embeds[0])


def test_lora_fuses_into_the_sdxl_unet(sdxl_folder: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from instaflow_core.inference.generate import apply_options

    model, source = load_source(sdxl_folder), load_source(sdxl_folder).denoiser
    source.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(SDXL.lora_targets)))
    gen = torch.Generator().manual_seed(0)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(source))
    state = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}  # B is zero at init
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=state)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    apply_options(model, lora=tmp_path / "lora", lora_scale=0.5)
    after = model.denoiser.state_dict()
    assert after.keys() == before.keys()  # fused: no LoRA layers left
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(any(t in k for t in SDXL.lora_targets) for k in changed)


def test_sample_cli_on_an_sdxl_student(teacher, sdxl_folder: Path, tmp_path: Path) -> None:
    from flows.cli.main import app

    out = SDXL.save_student(sdxl_folder, teacher.denoiser, tmp_path / "student", sample_size=8)
    rc = app(["sample", "a photo of a cat", "--model", str(out), "--num", "2", "--out", str(tmp_path / "s.png")],
             standalone_mode=False)  # fmt: skip
    assert rc in (None, 0) and (tmp_path / "s.png").stat().st_size > 0


def test_onnx_export_refuses_sdxl_in_one_line(teacher, tmp_path: Path) -> None:
    from instaflow_core.inference.onnx_export import export_onnx

    with pytest.raises(DataError) as info:
        export_onnx(teacher, tmp_path / "onnx")
    assert "sdxl" in str(info.value) and len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "onnx").exists()


# ------------------------------------------------------------------------------------------ preflight
def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def test_preflight_rules_for_sdxl(sdxl_folder: Path, tmp_path: Path) -> None:
    from instaflow_core.config import ModelsConfig, StorageConfig, load
    from instaflow_core.preflight import checks

    storage = StorageConfig(root=str(tmp_path / "store"))
    problems, geometry = checks.teacher_problems(ModelsConfig(teacher=str(sdxl_folder)), storage)
    assert problems == [] and geometry is not None and geometry.native_resolution == 64
    # unknown pipeline class
    other = _copy(sdxl_folder, tmp_path / "refiner")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionXLFooPipeline"})
    )
    (problem,), _ = checks.teacher_problems(ModelsConfig(teacher=str(other)), storage)
    assert "'StableDiffusionXLFooPipeline' is not supported" in problem and "\n" not in problem
    # a text encoder set to null (the refiner's layout), a tokenizer folder missing
    (other / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": [None, None]}))
    (problem,), _ = checks.teacher_problems(ModelsConfig(teacher=str(other)), storage)
    assert "names no text_encoder_2 (a sdxl model needs them)" in problem
    (other / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(other / "tokenizer_2")
    (problem,), _ = checks.teacher_problems(ModelsConfig(teacher=str(other)), storage)
    assert "tokenizer_2/" in problem
    # a resolution the VAE (x8) and the UNet (x4) cannot take; a sampler the family does not have
    sets = [f"models.teacher={sdxl_folder}", f"storage.root={tmp_path / 'store'}"]
    cfg = load("sdxl", [*sets, "generation.resolution=80", "generation.scheduler=pndm"])
    (problem,) = checks.resolution_problems(cfg, geometry)
    assert problem.startswith("generation.resolution=80: must be a multiple of 32 px")
    (problem,) = checks.setting_problems(cfg)
    assert "generation.scheduler='pndm'" in problem and "euler" in problem
    assert checks.setting_problems(load("sdxl", sets)) == []
    # guidance a family does not have (FLUX.1-schnell-like "none"): one line per setting
    from instaflow_core.models.sdxl import SDXLFamily

    class Unguided(SDXLFamily):
        guidance = "none"

    problems = Unguided().setting_problems(load("sdxl", [*sets, "generation.guidance_scale=3"]))
    assert problems == [
        "generation.guidance_scale=3.0: the sdxl teacher has no guidance (set it to 1)",
        "evaluation.teacher_guidance=5.0: the sdxl teacher has no guidance (set it to 1)",
    ]
