"""Images: decoding latents, N-step sample grids, one grid function, PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from instaflow_core.errors import DataError
from instaflow_core.models.family import Model


@torch.no_grad()
def decode_latents(model: Model, x1: Tensor, batch_size: int = 8) -> np.ndarray:
    """Our latents X1 (B, C, h, w) -> uint8 RGB images (B, H, W, 3), through the family's VAE decode (scaling
    and shift), post-processed as diffusers' pipelines do ((x / 2 + 0.5) clamped, x 255, rounded)."""
    out = []
    for chunk in x1.split(batch_size):
        img = model.family.decode(model, chunk)  # (b, 3, H, W) in [-1, 1]
        img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        out.append((img * 255).round().astype(np.uint8))
    if not out:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return np.concatenate(out)


def to_uint8(images: Any) -> np.ndarray:
    """Pipeline output (PIL list or float array in [0, 1]) -> uint8 (B, H, W, 3)."""
    if isinstance(images, list) and images and isinstance(images[0], PIL.Image.Image):
        return np.stack([np.asarray(im.convert("RGB")) for im in images])
    arr = np.asarray(images)
    return (arr * 255).round().clip(0, 255).astype(np.uint8) if arr.dtype != np.uint8 else arr


def image_grid(
    images: np.ndarray,
    cols: int | None = None,
    *,
    captions: Sequence[str] | None = None,
    min_side: int = 0,
    background: int = 0,
) -> np.ndarray:
    """Tile uint8 images (B, H, W, 3) row-major into one (rows*H', cols*W', 3) uint8 grid: the one grid function.

    cols: default ceil(sqrt(B)). min_side: upscale each tile (nearest) until its longer side is at least this
    (8x8 digits and 32x32 tiny images are unreadable at 1:1). captions: a line or three of text under each tile
    (the default bitmap font). Unused cells are `background` (0 black, 255 white).
    """
    b = len(images)
    if b == 0:
        raise DataError("no images for a grid")
    h, w = images.shape[1:3]
    scale = max(1, math.ceil(min_side / max(h, w))) if min_side else 1
    th, tw = h * scale, w * scale
    cols = max(1, min(cols or math.ceil(math.sqrt(b)), b))
    rows = math.ceil(b / cols)
    if captions is None:
        grid = np.full((rows * th, cols * tw, 3), background, dtype=np.uint8)
        for i, img in enumerate(images):
            r, c = divmod(i, cols)
            tile = np.asarray(img, np.uint8)
            if scale > 1:
                tile = tile.repeat(scale, axis=0).repeat(scale, axis=1)
            grid[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = tile
        return grid
    return _captioned(images, list(captions), cols, scale, background)


def _captioned(images: np.ndarray, captions: list[str], cols: int, scale: int, background: int) -> np.ndarray:
    import textwrap

    from PIL import ImageDraw, ImageFont

    if len(captions) != len(images):
        raise DataError(f"{len(captions)} captions for {len(images)} images")
    h, w = images.shape[1:3]
    th, tw = h * scale, w * scale
    font = ImageFont.load_default()
    chars = max(8, tw // 6)  # the default bitmap font is ~6 px wide
    wrapped = [textwrap.wrap(str(c), chars)[:3] or [""] for c in captions]
    line_h, pad = 12, 4
    cap_h = line_h * max(len(x) for x in wrapped) + 6
    rows = math.ceil(len(images) / cols)
    canvas = PIL.Image.new(
        "RGB", (cols * (tw + pad) + pad, rows * (th + cap_h + pad) + pad), (background,) * 3
    )
    draw = ImageDraw.Draw(canvas)
    ink = "black" if background > 127 else "white"
    for i, (img, lines) in enumerate(zip(images, wrapped, strict=True)):
        r, c = divmod(i, cols)
        x, y = pad + c * (tw + pad), pad + r * (th + cap_h + pad)
        canvas.paste(
            PIL.Image.fromarray(np.asarray(img, np.uint8)).resize((tw, th), PIL.Image.NEAREST), (x, y)
        )
        for k, line in enumerate(lines):
            draw.text((x, y + th + 3 + k * line_h), line, fill=ink, font=font)
    return np.asarray(canvas)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes."""
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
