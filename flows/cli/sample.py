"""`instaflow sample` and `instaflow interpolate`: images from any model the pipeline loads.

    instaflow sample "a red car" --num 4 --out car.png            # a grid from registration.model_name@champion
    instaflow sample "a red car" --model ./my-model --out cars/   # one PNG per image
    instaflow sample "a red car" --lora style.safetensors --lora-scale 0.8 --out lora.png
    instaflow sample "a red car" --delta sd15/unet dreamshaper/unet --alpha 1 --out ds.png
    instaflow sample "a red car" --controlnet canny-cn/ --control-image edges.png --out cn.png
    instaflow interpolate "a red car" "a blue boat" --frames 24 --out morph.gif

Steps and guidance default to what the model was registered with (1 step, no guidance for InstaFlow); a folder
defaults to 1 step. Image i uses seed S + i (noise is a seed, as in evaluation and serving).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from flows.cli.options import PresetOpt, SetOpt, load_config
from flows.cli.sources import ModelOpt, TrackingOpt, local_file, resolve_model
from instaflow_core.errors import ConfigError
from tasks.tracking.resolve import ResolvedModel

StepsOpt = typer.Option(
    None, "--steps", "-k", help="Euler steps (default: the model's registered steps, else 1)."
)
GuidanceOpt = typer.Option(
    None, "--guidance", "-g", help="Classifier-free guidance (1 = none; default: the model's)."
)
MinSideOpt = typer.Option(
    0, "--min-side", help="Upscale small images (nearest) to at least this many pixels."
)


def _check_prompt(prompt: str, what: str = "prompt") -> str:
    if not prompt or not prompt.strip():
        raise ConfigError(f'the {what} is empty: give the text to draw, e.g. "a red car"')
    return prompt


def _settings(model: ResolvedModel, steps: int | None, guidance: float | None) -> tuple[int, float]:
    steps = int(model.defaults.get("num_inference_steps", 1)) if steps is None else steps
    guidance = float(model.defaults.get("guidance_scale", 1.0)) if guidance is None else guidance
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    if guidance < 1.0:
        raise ConfigError(
            f"--guidance must be at least 1 (1 = no classifier-free guidance), got {guidance:g}"
        )
    return steps, guidance


def _describe(model: ResolvedModel) -> str:
    return f"{model.label} (models:/{model.name}/{model.version})" if model.version else model.label


def sample(
    prompt: str = typer.Argument(..., help="The text to draw."),
    model: str = ModelOpt,
    num: int = typer.Option(1, "--num", "-n", help="How many images (seeds S, S+1, ...)."),
    steps: int = StepsOpt,
    guidance: float = GuidanceOpt,
    seed: int = typer.Option(0, "--seed", help="Seed of the first image's noise."),
    out: Path = typer.Option(..., "--out", "-o", help="FILE.png (a grid) or a folder (one PNG per image)."),
    lora: str = typer.Option(None, "--lora", help="A LoRA file or folder (diffusers, PEFT or Kohya format)."),
    lora_scale: float = typer.Option(1.0, "--lora-scale", help="LoRA strength (fused into the weights)."),
    delta: tuple[str, str] | None = typer.Option(
        None, "--delta", help="BASE FINETUNED: add FINETUNED - BASE (UNet weights) to the model."
    ),
    alpha: float = typer.Option(1.0, "--alpha", help="Scale of the --delta weight difference."),
    controlnet: str = typer.Option(None, "--controlnet", help="A diffusers ControlNet folder."),
    control_image: str = typer.Option(None, "--control-image", help="The ControlNet's conditioning image."),
    control_scale: float = typer.Option(1.0, "--control-scale", help="ControlNet conditioning strength."),
    min_side: int = MinSideOpt,
    tracking_uri: str = TrackingOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Generate images from a registered model or a folder (one step by default)."""
    _check_prompt(prompt)
    if num < 1:
        raise ConfigError(f"--num must be at least 1, got {num}")
    if (controlnet is None) != (control_image is None):
        raise ConfigError("--controlnet and --control-image go together")
    if out.suffix and out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: give a .png file (a grid) or a folder (one PNG per image)")
    cfg = load_config(preset, set_)
    resolved = resolve_model(model, preset, set_, tracking_uri)
    steps, guidance = _settings(resolved, steps, guidance)
    from instaflow_core.inference.generate import (
        apply_options,
        flow_images,
        load_control_image,
        load_model_folder,
    )
    from instaflow_core.inference.media import write_images

    storage = cfg.storage
    loaded = load_model_folder(
        resolved.folder,
        dtype=cfg.models.dtype,
        controlnet=local_file(controlnet, storage, "--controlnet") if controlnet else None,
    )
    base, finetuned = delta or (None, None)
    apply_options(
        loaded,
        lora=local_file(lora, storage, "--lora") if lora else None,
        lora_scale=lora_scale,
        delta=(local_file(base, storage, "--delta BASE"), local_file(finetuned, storage, "--delta FINETUNED"))
        if base
        else None,
        alpha=alpha,
    )
    image = (
        load_control_image(local_file(control_image, storage, "--control-image")) if control_image else None
    )
    seeds = [seed + i for i in range(num)]
    start = time.perf_counter()
    images = flow_images(
        loaded, [prompt] * num, seeds, steps, guidance, control_image=image, control_scale=control_scale
    )
    per_image = (time.perf_counter() - start) / num
    files = write_images(images, out, [f"{i:03d}-seed{s}" for i, s in enumerate(seeds)], min_side=min_side)
    where = files[0] if len(files) == 1 else f"{out}/ ({len(files)} files)"
    typer.echo(
        f"wrote {where}: {num} image(s) {images.shape[2]}x{images.shape[1]}, {steps} step(s), guidance {guidance:g}, "
        f"{per_image * 1000:.0f} ms per image, from {_describe(resolved)}"
    )


def interpolate(
    prompt_a: str = typer.Argument(..., help="The first frame's prompt."),
    prompt_b: str = typer.Argument(..., help="The last frame's prompt."),
    model: str = ModelOpt,
    frames: int = typer.Option(24, "--frames", "-f", help="Number of frames (at least 2)."),
    out: Path = typer.Option(..., "--out", "-o", help="x.gif or x.mp4"),
    seed: int = typer.Option(0, "--seed", help="Seed of the first frame's noise."),
    seed_b: int = typer.Option(
        None, "--seed-b", help="Seed of the last frame's noise (default: --seed + 1)."
    ),
    steps: int = StepsOpt,
    guidance: float = GuidanceOpt,
    fps: float = typer.Option(12.0, "--fps", help="Frames per second."),
    min_side: int = MinSideOpt,
    tracking_uri: str = TrackingOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """An animation from prompt A to prompt B: the noise slerped, the conditions lerped."""
    _check_prompt(prompt_a, "first prompt")
    _check_prompt(prompt_b, "second prompt")
    if out.suffix.lower() not in (".gif", ".mp4"):
        raise ConfigError(f"--out {out}: give a .gif or an .mp4 file")
    if frames < 2:
        raise ConfigError(f"--frames must be at least 2, got {frames}")
    cfg = load_config(preset, set_)
    resolved = resolve_model(model, preset, set_, tracking_uri)
    steps, guidance = _settings(resolved, steps, guidance)
    from instaflow_core.inference.generate import interpolation_frames, load_model_folder
    from instaflow_core.inference.media import upscale, write_animation

    loaded = load_model_folder(resolved.folder, dtype=cfg.models.dtype)
    seeds = (seed, seed + 1 if seed_b is None else seed_b)
    start = time.perf_counter()
    video = interpolation_frames(loaded, (prompt_a, prompt_b), seeds, frames, steps, guidance)
    seconds = time.perf_counter() - start
    write_animation(upscale(video, min_side), out, fps)
    typer.echo(
        f"wrote {out}: {frames} frames {video.shape[2]}x{video.shape[1]} at {fps:g} fps, seeds {seeds[0]} -> "
        f"{seeds[1]}, {steps} step(s) each, {seconds / frames * 1000:.0f} ms per frame, from {_describe(resolved)}"
    )
