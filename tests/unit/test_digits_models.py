"""The digits models behave like SD components behind the SD family's seam: called like a UNet, saved as a
diffusers folder that the project's loader (as the digits family) and `InstaFlowPipeline.from_pretrained` (in a
fresh process) load, VAE the identity."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from instaflow_core.experiments.digits.config import DigitsModelConfig
from instaflow_core.experiments.digits.model import (
    FAMILY,
    DigitsPixelVAE,
    DigitsVelocityNet,
    build_digits,
)
from instaflow_core.models.family import get_family
from tests.support import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def comps():
    c = build_digits(DigitsModelConfig())
    with torch.no_grad():  # break the zero init of the output layers, so outputs depend on every input
        for p in c.denoiser.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return c


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_velocity_net_is_called_like_a_unet(comps, pooling):
    net = DigitsVelocityNet(cross_attention_dim=64, text_pooling=pooling, text_norm="layer")
    for p in net.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    net.eval()
    emb = comps.encode(["digit 3", "seven", "a handwritten digit one", ""]).embeds
    x = torch.randn(4, 1, 8, 8)
    out = net(x, torch.full((4,), 999.0), encoder_hidden_states=emb)
    assert out.sample.shape == x.shape
    torch.testing.assert_close(net(x, 999.0, emb, return_dict=False)[0], out.sample)  # scalar tau broadcasts
    assert not net(x, torch.full((4,), 10.0), emb).sample.allclose(out.sample)  # it sees the timestep
    assert not net(x, torch.full((4,), 999.0), emb.flip(0)).sample.allclose(out.sample)  # and the text
    with pytest.raises(ValueError, match="ControlNet"):
        net(x, 999.0, emb, down_block_additional_residuals=[x])


def test_the_family_maps_t_to_the_unet_timestep(comps):
    assert comps.family is FAMILY is get_family("digits") and comps.denoiser is comps["unet"]
    v = comps.velocity()
    x0, cond = torch.randn(2, 1, 8, 8), comps.encode(["digit 3", "seven"])
    torch.testing.assert_close(
        v(x0, torch.zeros(2), cond), comps.denoiser(x0, torch.full((2,), 1000.0), cond.embeds).sample
    )
    assert comps.latent_shape() == (1, 8, 8)


def test_pixel_vae_is_an_identity_autoencoder(tmp_path):
    vae = DigitsPixelVAE()
    img = torch.rand(2, 1, 8, 8).expand(-1, 3, -1, -1) * 2 - 1  # grey RGB
    z = vae.encode(img).latent_dist.sample() * vae.config.scaling_factor
    assert z.shape == (2, 1, 8, 8)
    torch.testing.assert_close(vae.decode(z / vae.config.scaling_factor).sample, img)
    assert vae.decode(torch.full((1, 1, 8, 8), 3.0)).sample.max() == 1.0  # clamped to the image range
    vae.save_pretrained(tmp_path / "vae")
    assert DigitsPixelVAE.from_pretrained(tmp_path / "vae").config.block_out_channels == [1]


def test_a_saved_folder_loads_everywhere(comps, tmp_path):
    """Model.save -> load_source (the project's loader: the digits family, from model_index.json) and
    InstaFlowPipeline.from_pretrained in a fresh interpreter that imports nothing but the pipeline: the same
    images."""
    from instaflow_core.inference.generate import flow_images
    from instaflow_core.inference.pipeline import InstaFlowPipeline
    from instaflow_core.models.family import family_of
    from instaflow_core.models.loading import load_source
    from instaflow_core.rectified_flow import noise_from_seeds

    folder = comps.save(tmp_path / "digits")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["instaflow_core.experiments.digits.model", "DigitsVelocityNet"]
    assert index["vae"] == ["instaflow_core.experiments.digits.model", "DigitsPixelVAE"]
    assert family_of(folder) is FAMILY
    loaded = load_source(folder)
    assert loaded.family is FAMILY
    assert type(loaded.denoiser) is DigitsVelocityNet and type(loaded.vae) is DigitsPixelVAE
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    pipe = InstaFlowPipeline.from_model(comps)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(["digit 3", "seven"], num_inference_steps=2, latents=x0, output_type="np").images
    torch.save(x0, tmp_path / "x0.pt")
    code = (
        "import sys, torch, numpy as np\n"
        "from instaflow_core.inference.pipeline import InstaFlowPipeline\n"
        f"p = InstaFlowPipeline.from_pretrained({str(folder)!r}); p.set_progress_bar_config(disable=True)\n"
        f"x0 = torch.load({str(tmp_path / 'x0.pt')!r})\n"
        "out = p(['digit 3', 'seven'], num_inference_steps=2, latents=x0, output_type='np').images\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out); print(type(p.unet).__name__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DigitsVelocityNet" in proc.stdout
    import numpy as np

    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), ref, atol=1e-6)
    # the project's own sampler over the loaded model gives the pipeline's images (uint8 of the same floats)
    ours = flow_images(loaded, ["digit 3", "seven"], [0, 0], steps=2)
    assert ours.shape == (2, 8, 8, 3)
    mine = InstaFlowPipeline.from_model(loaded)
    mine.set_progress_bar_config(disable=True)
    x0_seeded = noise_from_seeds([0, 0], (1, 8, 8))
    again = mine(["digit 3", "seven"], num_inference_steps=2, latents=x0_seeded, output_type="np").images
    assert np.abs(ours.astype(int) - (again * 255).round().astype(int)).max() <= 1


def test_mean_pooling_sees_the_prompt_not_the_padding(comps):
    """The net mean-pools the 77 CLIP states; different prompts give different velocities (BatchNorm'd text)."""
    v = comps.velocity()
    emb = comps.encode([f"a handwritten digit {w}" for w in ("zero", "one", "two", "three")])
    x, t = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1), torch.full((4,), 0.5)
    out = v(x, t, emb)
    assert torch.cdist(out.flatten(1), out.flatten(1)).triu(1).max() > 0
