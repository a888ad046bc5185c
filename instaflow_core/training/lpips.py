"""LPIPS for the second distillation stage: the real network where its weights exist, a stand-in for tests.

The paper's stage 2 decodes the one-step prediction and the 2-RF target with the VAE and compares the images
with LPIPS (VGG). The `lpips` package needs torchvision, which cannot be imported on the CPU machines this
project is tested on, and no pip package ships the VGG backbone weights; so:

- `build_lpips(path)` loads the real `lpips.LPIPS` from local files only (no download). `path` is either
  a full LPIPS state dict (backbone + linear layers: `torch.save(lpips.LPIPS(net="vgg").state_dict(), p)`),
  or the package's linear-layer file (`lpips/weights/v0.1/vgg.pth`), in which case the backbone comes from
  torchvision's local cache (`$TORCH_HOME`), as `lpips.LPIPS(pretrained=True)` does.
- `build_lpips("tiny")` is `TinyLPIPS`: the same computation (scaled input, a conv trunk, unit-normalised
  channel features, squared differences weighted by non-negative 1x1 convolutions, spatial mean, summed over
  layers) on a small random trunk fixed by a seed. It goes through the same interface as the real one, so the
  stage-2 code path (decode -> distance -> gradient into the student) is exercised on any machine.

Both are frozen `nn.Module`s: `net(img_a, img_b) -> (B, 1, 1, 1)` with images in [-1, 1]; gradients flow to
the inputs only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from instaflow_core.errors import ConfigError, DataError

TINY = "tiny"

# channels of the five feature slices the LPIPS linear layers sit on, per trunk (to recognise a weights file)
_TRUNK_CHANNELS = {"vgg": [64, 128, 256, 512, 512], "alex": [64, 192, 384, 256, 256]}


def _normalize(feat: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise each spatial position's channel vector, (B, C, H, W) -> same."""
    return feat / (torch.sqrt(torch.sum(feat**2, dim=1, keepdim=True) + eps) + eps)


class TinyLPIPS(nn.Module):
    """A stand-in LPIPS: random conv trunk (fixed seed), learned-LPIPS-style head. Not a perceptual metric."""

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32), seed: int = 0) -> None:
        super().__init__()
        # ImageNet-style input scaling, the same constants LPIPS v0.1 uses
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        gen = torch.Generator().manual_seed(seed)
        slices, lins, c_in = [], [], 3
        for i, c in enumerate(channels):
            conv = nn.Conv2d(c_in, c, 3, padding=1, stride=1 if i == 0 else 2)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * c_in)) ** 0.5)
                conv.bias.zero_()
            slices.append(nn.Sequential(conv, nn.ReLU()))
            lin = nn.Conv2d(c, 1, 1, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.rand(lin.weight.shape, generator=gen) / c)  # non-negative, like LPIPS'
            lins.append(lin)
            c_in = c
        self.slices = nn.ModuleList(slices)
        self.lins = nn.ModuleList(lins)
        self.requires_grad_(False).eval()

    def forward(self, in0: Tensor, in1: Tensor) -> Tensor:
        """in0, in1 (B, 3, H, W) in [-1, 1] -> distance (B, 1, 1, 1)."""
        h0, h1 = (in0 - self.shift) / self.scale, (in1 - self.shift) / self.scale
        total = torch.zeros(in0.shape[0], 1, 1, 1, dtype=in0.dtype, device=in0.device)
        for block, lin in zip(self.slices, self.lins, strict=True):
            h0, h1 = block(h0), block(h1)
            diff = (_normalize(h0) - _normalize(h1)) ** 2  # (B, C, h, w)
            total = total + lin(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _trunk_of(state: dict[str, Tensor]) -> str:
    lin1 = next((v for k, v in state.items() if k.startswith("lin1.") and k.endswith("weight")), None)
    if lin1 is None:
        raise DataError(
            "LPIPS weights: no linear layers (lin0..lin4) in the file; expected an LPIPS state dict"
        )
    for name, chans in _TRUNK_CHANNELS.items():
        if lin1.shape[1] == chans[1]:
            return name
    raise DataError(f"LPIPS weights: unknown trunk (lin1 has {lin1.shape[1]} input channels)")


def _real_lpips(path: Path) -> nn.Module:
    """`lpips.LPIPS` from local weights only (see the module docstring for the two accepted files)."""
    if not path.is_file():
        raise ConfigError(f"distillation.lpips_weights: {path} does not exist")
    try:
        import lpips  # needs torchvision: GPU machines only in this project
    except Exception as err:  # ImportError, or torchvision's operator registration failing
        raise ConfigError(
            f"distillation.lpips_weights is set but the `lpips` package cannot be imported ({str(err).splitlines()[0]}):"
            " pip install lpips (with a working torchvision), or use lpips_weights=tiny for the stand-in"
        ) from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = _trunk_of(state)
    if any(k.startswith("net.") for k in state):
        # full state dict: build with a random trunk (no download), then load everything
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
        model.load_state_dict(state, strict=False)
        missing = [k for k in model.state_dict() if k not in state and not k.startswith("scaling_layer.")]
        if missing:
            raise DataError(f"LPIPS weights {path.name}: missing {missing[0]} (and {len(missing) - 1} more)")
    else:
        # linear layers only: the trunk comes from torchvision's cache (lpips' own behaviour)
        model = lpips.LPIPS(pretrained=True, net=net, model_path=str(path), verbose=False)
    return model.requires_grad_(False).eval()


def build_lpips(weights: str | None) -> nn.Module:
    """The LPIPS network for `distillation.lpips_weights`: "tiny" = the stand-in, a path = the real one."""
    if weights is None:
        raise ConfigError(
            "a distill stage uses loss 'lpips' but distillation.lpips_weights is not set: give a local LPIPS weights "
            "file, 'tiny' for the stand-in network, or use loss l2 / pseudo_huber"
        )
    if weights == TINY:
        return TinyLPIPS()
    src = weights[len("file://") :] if weights.startswith("file://") else weights
    return _real_lpips(Path(src).expanduser())


def vae_decoder(model: Any) -> Callable[[Tensor], Tensor]:
    """Our latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] through the model family's decode, differentiable.

    The VAE stays frozen; gradients reach the latents (the student's one-step prediction) through it.
    """
    model.vae.requires_grad_(False)

    def decode(latents: Tensor) -> Tensor:
        return model.family.decode(model, latents).clamp(-1.0, 1.0)

    return decode


def lpips_distance(net: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap an LPIPS module as `(img_a, img_b) -> (B,)` (the form `rectified_flow.distill_loss` averages)."""

    def distance(a: Tensor, b: Tensor) -> Tensor:
        p = next(net.parameters(), None)
        if p is not None and p.device != a.device:
            net.to(a.device)
        return net(a.float(), b.float()).reshape(a.shape[0])

    return distance
