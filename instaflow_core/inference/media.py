"""Image files out: one PNG per image or a grid, and animations (GIF with Pillow, MP4 with imageio-ffmpeg).

imageio-ffmpeg's wheel ships a static ffmpeg binary, so MP4 needs no system package and nothing is downloaded
at run time. H.264 in yuv420p (what browsers play) needs even sides: odd frames are padded by one pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image

from instaflow_core.errors import DataError
from instaflow_core.inference.images import image_grid

IMAGE_SUFFIXES = (".png",)
ANIMATION_SUFFIXES = (".gif", ".mp4")


def upscale(images: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour upscale (B, H, W, 3) by an integer factor until the longer side is >= min_side."""
    side = max(images.shape[1:3])
    factor = max(1, -(-min_side // side)) if min_side else 1
    return images.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else images


def write_images(images: np.ndarray, out: Path, names: Sequence[str], min_side: int = 0) -> list[Path]:
    """uint8 (B, H, W, 3) -> out.png (one grid) or out/<name>.png each (out a folder); returns the files."""
    if out.suffix.lower() in IMAGE_SUFFIXES:
        out.parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(image_grid(images, min_side=min_side)).save(out)
        return [out]
    if out.suffix:
        raise DataError(f"--out {out}: give a .png file (a grid) or a folder (one PNG per image)")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for image, name in zip(upscale(images, min_side), names, strict=True):
        files.append(out / f"{name}.png")
        PIL.Image.fromarray(image).save(files[-1])
    return files


def write_animation(frames: np.ndarray, out: Path, fps: float = 12.0) -> Path:
    """uint8 frames (N, H, W, 3) -> out.gif (looping) or out.mp4 (H.264)."""
    suffix = out.suffix.lower()
    if suffix not in ANIMATION_SUFFIXES:
        raise DataError(f"--out {out}: give a .gif or an .mp4 file")
    if fps <= 0:
        raise DataError(f"--fps must be positive, got {fps}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        images = [PIL.Image.fromarray(f) for f in frames]
        images[0].save(out, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return out
    import imageio.v2 as imageio

    h, w = frames.shape[1:3]
    if h % 2 or w % 2:  # yuv420p subsamples chroma 2x2
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    # macro_block_size=1: keep the size (the default 16 would resize other sizes, with a warning)
    with imageio.get_writer(
        out, fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1, quality=8
    ) as writer:
        for frame in frames:
            writer.append_data(frame)
    return out
