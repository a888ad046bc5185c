"""InstaFlowPipeline: the Euler loop against a hand-written reference, released-folder loading, LoRA, ControlNet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ControlNetModel, PNDMScheduler

from instaflow_core.config import TinyModelConfig
from instaflow_core.errors import DataError
from instaflow_core.inference.pipeline import InstaFlowPipeline, slerp
from instaflow_core.models.family import Model
from instaflow_core.models.lora import load_lora, merge_weight_delta, weight_delta
from instaflow_core.models.sd import build_tiny, clip_hidden_states
from instaflow_core.rectified_flow import noise_from_seeds

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of a cat", "a red car on a street"]


@pytest.fixture()
def pipe(tiny: Model) -> InstaFlowPipeline:
    p = InstaFlowPipeline.from_model(build_tiny(TinyModelConfig()))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def released_layout(tiny: Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny folder laid out like XCLiu/instaflow_0_9B_from_sd_1_5: SD model_index, PNDM, null safety parts."""
    folder = tiny.save(tmp_path_factory.mktemp("released") / "instaflow")
    PNDMScheduler.from_config(tiny.scheduler.config, skip_prk_steps=True).save_pretrained(
        folder / "scheduler"
    )
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.21.4",
        "feature_extractor": [None, None],
        "requires_safety_checker": True,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


@torch.no_grad()
def reference_euler(
    c: Model, prompts: list[str], x0: torch.Tensor, steps: int, guidance: float, negative: str = ""
) -> torch.Tensor:
    """INSTAFLOW.md's loop, written against the bare UNet: x += dt * v(x, t_i), UNet fed (1 - t) * 1000."""
    cond = clip_hidden_states(c["text_encoder"], c["tokenizer"], prompts)
    uncond = clip_hidden_states(c["text_encoder"], c["tokenizer"], [negative] * len(prompts))
    x, dt = x0.clone(), 1.0 / steps
    for i in range(steps):
        tau = torch.full((x.shape[0],), (1.0 - i / steps) * 1000.0)
        v = c.denoiser(x, tau, encoder_hidden_states=cond).sample
        if guidance > 1.0:
            v_u = c.denoiser(x, tau, encoder_hidden_states=uncond).sample
            v = v_u + guidance * (v - v_u)
        x = x + dt * v
    return x


# ------------------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize(("steps", "guidance"), [(1, 1.0), (1, 2.0), (3, 1.0), (3, 1.5)])
def test_latents_equal_reference_euler(
    tiny: Model, pipe: InstaFlowPipeline, steps: int, guidance: float
) -> None:
    x0 = noise_from_seeds([1, 2], (4, 8, 8))
    got = pipe(
        PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=x0, output_type="latent"
    ).images
    ref = reference_euler(tiny, PROMPTS, x0, steps, guidance)
    assert got.shape == (2, 4, 8, 8)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), (got - ref).abs().max()
    if steps == 1 and guidance == 1.0:  # one step is X0 + v(X0, t=0): the UNet at timestep 1000
        with torch.no_grad():
            v = tiny.denoiser(
                x0,
                1000.0,
                encoder_hidden_states=clip_hidden_states(tiny["text_encoder"], tiny["tokenizer"], PROMPTS),
            )
        assert torch.allclose(got, x0 + v.sample, atol=1e-5)


def test_negative_prompt_and_outputs(tiny: Model, pipe: InstaFlowPipeline) -> None:
    x0 = noise_from_seeds([3], (4, 8, 8))
    got = pipe(
        PROMPTS[:1],
        negative_prompt="blurry",
        num_inference_steps=2,
        guidance_scale=2.0,
        latents=x0,
        output_type="latent",
    ).images
    assert torch.allclose(got, reference_euler(tiny, PROMPTS[:1], x0, 2, 2.0, negative="blurry"), atol=1e-4)
    gen = torch.Generator().manual_seed(0)
    np_out = pipe(PROMPTS, num_inference_steps=1, generator=gen, output_type="np").images
    assert np_out.shape == (2, 16, 16, 3) and 0.0 <= np_out.min() and np_out.max() <= 1.0
    pil_out = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), num_images_per_prompt=2).images
    assert len(pil_out) == 2 and isinstance(pil_out[0], PIL.Image.Image) and pil_out[0].size == (16, 16)
    # the same generator seed reproduces the same images
    again = pipe(
        PROMPTS, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert np.array_equal(np_out, again)
    with pytest.raises(DataError, match="latents have shape"):
        pipe(PROMPTS, latents=x0)


def test_loads_released_layout_and_round_trips(tiny: Model, released_layout: Path, tmp_path: Path) -> None:
    loaded = InstaFlowPipeline.from_pretrained(released_layout)
    loaded.set_progress_bar_config(disable=True)
    assert (
        isinstance(loaded, InstaFlowPipeline) and loaded.safety_checker is None and loaded.controlnet is None
    )
    assert isinstance(loaded.scheduler, PNDMScheduler)  # kept, unused by the Euler loop
    x0 = noise_from_seeds([4, 5], (4, 8, 8))
    ref = reference_euler(tiny, PROMPTS, x0, 2, 1.5)
    got = loaded(PROMPTS, num_inference_steps=2, guidance_scale=1.5, latents=x0, output_type="latent").images
    assert torch.allclose(got, ref, atol=1e-5 * float(ref.abs().max()))
    # our own save_pretrained / from_pretrained round trip
    loaded.save_pretrained(tmp_path / "ours")
    assert (
        json.loads((tmp_path / "ours" / "model_index.json").read_text())["_class_name"] == "InstaFlowPipeline"
    )
    back = InstaFlowPipeline.from_pretrained(tmp_path / "ours")
    back.set_progress_bar_config(disable=True)
    again = back(PROMPTS, num_inference_steps=2, guidance_scale=1.5, latents=x0, output_type="latent").images
    assert torch.equal(again, got)


# --------------------------------------------------------------------------------------- weight deltas
def test_merge_weight_delta(tiny: Model, pipe: InstaFlowPipeline, tmp_path: Path) -> None:
    base = {k: v.clone() for k, v in tiny.denoiser.state_dict().items()}
    finetuned = build_tiny(TinyModelConfig(seed=7)).denoiser
    ft_state = {k: v.clone() for k, v in finetuned.state_dict().items()}
    target = build_tiny(TinyModelConfig(seed=9)).denoiser
    pipe.unet.load_state_dict(target.state_dict())
    merge_weight_delta(pipe, ft_state, base, 0.5)
    merged = pipe.unet.state_dict()
    for k, v in target.state_dict().items():
        assert torch.allclose(merged[k], v + 0.5 * (ft_state[k] - base[k]), atol=1e-6), k
    # the same from files: a fine-tuned UNet folder minus the base folder, and the delta helper
    finetuned.save_pretrained(tmp_path / "ft")
    tiny.denoiser.save_pretrained(tmp_path / "base")
    pipe.unet.load_state_dict(target.state_dict())
    merge_weight_delta(pipe.unet, tmp_path / "ft", tmp_path / "base", 0.5)
    assert all(torch.allclose(pipe.unet.state_dict()[k], merged[k], atol=1e-6) for k in merged)
    delta = weight_delta(tmp_path / "ft", tmp_path / "base")
    assert torch.allclose(delta["conv_in.weight"], ft_state["conv_in.weight"] - base["conv_in.weight"])
    with pytest.raises(DataError, match="does not match the UNet"):
        merge_weight_delta(pipe, {"conv_in.weight": torch.zeros(1)}, base, 1.0)


# ------------------------------------------------------------------------------------------------- LoRA
def _fresh() -> InstaFlowPipeline:
    p = InstaFlowPipeline.from_model(build_tiny(TinyModelConfig()))
    p.set_progress_bar_config(disable=True)
    return p


def _one_step(p: InstaFlowPipeline, x0: torch.Tensor) -> torch.Tensor:
    return p(PROMPTS[:1], num_inference_steps=1, latents=x0, output_type="latent").images


def _random_lora() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A random (non-zero) rank-4 PEFT LoRA on the attention projections, and the latents it produces unfused."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    p = _fresh()
    torch.manual_seed(0)
    p.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(p.unet).items()}
    return state, _one_step(p, noise_from_seeds([8], (4, 8, 8)))


def _merged_by_hand(state: dict[str, torch.Tensor], scale: float, x0: torch.Tensor) -> torch.Tensor:
    """Latents of a UNet whose weights are W + scale * B @ A, merged here without diffusers or peft."""
    p = _fresh()
    weights = p.unet.state_dict()
    with torch.no_grad():
        for key, a in state.items():
            if ".lora_A." in key:
                module = key.split(".lora_A.")[0]
                weights[f"{module}.weight"] += scale * state[key.replace(".lora_A.", ".lora_B.")] @ a
    return _one_step(p, x0)


def _to_kohya(peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys -> Kohya sd-scripts keys (lora_unet_<module_with_underscores>.lora_down/.lora_up/.alpha)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        module, kind = key.rsplit(".lora_", 1)  # "down_blocks.0...to_q", "A.weight"
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(4.0)  # alpha = rank: scale 1
    return out


def test_lora_diffusers_and_kohya_files(tmp_path: Path) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    state, with_lora = _random_lora()
    x0 = noise_from_seeds([8], (4, 8, 8))
    plain = _one_step(_fresh(), x0)
    assert not torch.allclose(plain, with_lora, atol=0.1)  # the LoRA matters: the test can fail
    tol = 1e-5 * float(with_lora.abs().max())
    full, half = _merged_by_hand(state, 1.0, x0), _merged_by_hand(state, 0.5, x0)
    assert torch.allclose(full, with_lora, atol=0.05)  # fused vs unfused: same maths, other rounding

    InstaFlowPipeline.save_lora_weights(
        tmp_path / "diffusers_lora", unet_lora_layers=convert_state_dict_to_diffusers(state)
    )
    kohya = tmp_path / "kohya_lora.safetensors"
    save_file(_to_kohya(state), str(kohya))
    for source in (tmp_path / "diffusers_lora", kohya):
        assert torch.allclose(_one_step(load_lora(_fresh(), source), x0), full, atol=tol), source
        assert torch.allclose(_one_step(load_lora(_fresh(), source, fuse=False), x0), with_lora, atol=tol), (
            source
        )
    assert torch.allclose(_one_step(load_lora(_fresh(), kohya, scale=0.5), x0), half, atol=tol)
    assert not torch.allclose(half, full, atol=0.1)
    with pytest.raises(DataError, match="not found"):
        load_lora(_fresh(), tmp_path / "missing.safetensors")


# -------------------------------------------------------------------------------------------- ControlNet
def test_controlnet_residuals_enter_the_unet_call(tiny: Model) -> None:
    c = build_tiny(TinyModelConfig())
    torch.manual_seed(0)
    # one downsampling in the conditioning embedding: 16 px images -> 8 x 8 latents (VAE factor 2)
    controlnet = ControlNetModel.from_unet(c.denoiser, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # zero convs start at zero (no effect): make them matter
        for p in controlnet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    pipe = InstaFlowPipeline.from_model(c, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x0 = noise_from_seeds([6, 7], (4, 8, 8))

    got = pipe(
        PROMPTS,
        image=image,
        controlnet_conditioning_scale=0.8,
        num_inference_steps=2,
        guidance_scale=1.5,
        latents=x0,
        output_type="latent",
    ).images
    # reference: the same loop with the ControlNet called by hand at tau = (1 - t) * 1000
    cond = clip_hidden_states(c["text_encoder"], c["tokenizer"], PROMPTS)
    uncond = clip_hidden_states(c["text_encoder"], c["tokenizer"], [""] * 2)
    x = x0.clone()
    with torch.no_grad():
        for i in range(2):
            tau = torch.full((2,), (1.0 - i / 2) * 1000.0)
            vs = []
            for emb in (uncond, cond):
                down, mid = controlnet(
                    x,
                    tau,
                    encoder_hidden_states=emb,
                    controlnet_cond=image.expand(2, -1, -1, -1),
                    conditioning_scale=0.8,
                    return_dict=False,
                )
                vs.append(
                    c.denoiser(
                        x,
                        tau,
                        encoder_hidden_states=emb,
                        down_block_additional_residuals=down,
                        mid_block_additional_residual=mid,
                    ).sample
                )
            x = x + 0.5 * (vs[0] + 1.5 * (vs[1] - vs[0]))
    assert torch.allclose(got, x, atol=1e-5 * float(x.abs().max())), (got - x).abs().max()

    no_control = InstaFlowPipeline.from_model(c)
    no_control.set_progress_bar_config(disable=True)
    base = no_control(
        PROMPTS, num_inference_steps=2, guidance_scale=1.5, latents=x0, output_type="latent"
    ).images
    zero = pipe(
        PROMPTS,
        image=image,
        controlnet_conditioning_scale=0.0,
        num_inference_steps=2,
        guidance_scale=1.5,
        latents=x0,
        output_type="latent",
    ).images
    assert torch.allclose(zero, base, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)
    with pytest.raises(DataError, match="no controlnet"):
        no_control(PROMPTS, image=image)


# ------------------------------------------------------------------------------------------------ slerp
def test_slerp() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    # orthogonal unit rows: the midpoint stays on the sphere (a straight average would shrink to 0.707)
    u = torch.zeros(1, 4)
    w = torch.zeros(1, 4)
    u[0, 0], w[0, 1] = 1.0, 1.0
    mid = slerp(u, w, 0.5)
    assert torch.allclose(mid, torch.tensor([[0.5**0.5, 0.5**0.5, 0.0, 0.0]]), atol=1e-6)
    # per-row alpha, and (anti)parallel-safe: equal rows give the row back
    per_row = slerp(a, b, torch.tensor([0.0, 1.0, 0.5]))
    assert torch.allclose(per_row[0], a[0], atol=1e-6) and torch.allclose(per_row[1], b[1], atol=1e-6)
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-5)
    with pytest.raises(DataError):
        slerp(a, b[:2], 0.5)
