"""The demo page (Gradio): a Generate tab and a Compare tab over plain generator callables.

This module is UI only: a `DemoModel` is a label, a generator `(prompts, seeds, steps, guidance) -> uint8
(B, H, W, 3)`, its default steps/guidance and a lineage dict to show. The CLI (`instaflow demo`) builds them from
registered models, folders and the teacher; nothing here knows about MLflow or the store. Gradio is imported
inside the functions, so the rest of instaflow_core imports without it.

Offline by construction: GRADIO_ANALYTICS_ENABLED=False before gradio is imported (otherwise the Blocks
constructor GETs api.gradio.app and launch() posts telemetry), analytics_enabled=False, share=False (no tunnel),
no server-side rendering (node), no MCP server; the default theme's fonts are bundled. Bound to loopback.
API names (gradio_client): /generate (prompt, seed, steps, guidance, batch, model) and /compare.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from instaflow_core.errors import InstaflowError
from instaflow_core.inference.media import upscale

Generator = Callable[[list[str], list[int], int, float], np.ndarray]
LOOPBACK = "127.0.0.1"
MAX_COMPARE = 3
NONE = "(none)"
DISPLAY_SIDE = 256  # tiny models make 32 px images: shown upscaled (nearest) to at least this


@dataclass
class DemoModel:
    """One selectable model: how to generate with it, its defaults, and the lineage shown beside its images."""

    label: str
    generate: Generator
    steps: int = 1
    guidance: float = 1.0
    lineage: dict[str, Any] = field(default_factory=dict)
    load: Callable[[], Any] | None = None  # loads the weights (first use): kept out of the time per image


def offline_env() -> None:
    """Environment that keeps gradio (and huggingface_hub under it) from calling home; before `import gradio`."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _run(model: DemoModel, prompts: list[str], seeds: list[int], steps: int, guidance: float):
    """(images, seconds per image); a user mistake becomes the page's one-line error."""
    import gradio as gr

    if steps < 1:
        raise gr.Error("steps must be at least 1")
    try:
        if model.load is not None:
            model.load()
        start = time.perf_counter()
        images = model.generate(prompts, seeds, int(steps), float(guidance))
    except InstaflowError as err:
        raise gr.Error(str(err)) from err
    return images, (time.perf_counter() - start) / max(1, len(prompts))


def build_demo(models: Sequence[DemoModel], title: str = "instaflow") -> Any:
    """gr.Blocks with the Generate and Compare tabs over `models` (the first one selected)."""
    offline_env()
    import gradio as gr

    if not models:
        raise ValueError("the demo needs at least one model")
    by_label = {m.label: m for m in models}
    labels = list(by_label)

    def pick(label: str):
        m = by_label[label]
        return m.steps, m.guidance, m.lineage

    def generate(prompt: str, seed: float, steps: float, guidance: float, batch: float, label: str):
        if not (prompt or "").strip():
            raise gr.Error("enter a prompt")
        model = by_label[label]
        n = max(1, int(batch))
        seeds = [int(seed) + i for i in range(n)]
        images, per_image = _run(model, [prompt] * n, seeds, int(steps), float(guidance))
        gallery = [
            (upscale(img[None], DISPLAY_SIDE)[0], f"seed {s}") for img, s in zip(images, seeds, strict=True)
        ]
        timing = (
            f"**{per_image * 1000:.1f} ms per image** ({n} image(s) of {images.shape[2]}x{images.shape[1]}, "
            f"{int(steps)} step(s), guidance {float(guidance):g}, {label})"
        )
        return gallery, timing, model.lineage

    def compare(prompt: str, seed: float, *slots: Any):
        if not (prompt or "").strip():
            raise gr.Error("enter a prompt")
        cells: list[Any] = []
        rows = []
        for i in range(MAX_COMPARE):
            label, steps, guidance = slots[3 * i : 3 * i + 3]
            if not label or label == NONE:
                cells.append(gr.Image(value=None, label=f"slot {i + 1}: empty"))
                continue
            images, per_image = _run(by_label[label], [prompt], [int(seed)], int(steps), float(guidance))
            caption = f"{label}: {int(steps)} step(s), {per_image * 1000:.1f} ms"
            cells.append(gr.Image(value=upscale(images, DISPLAY_SIDE)[0], label=caption))
            rows.append(f"| {label} | {int(steps)} | {float(guidance):g} | {per_image * 1000:.1f} ms |")
        if not rows:
            raise gr.Error("choose at least one model")
        table = "| model | steps | guidance | time per image |\n|---|---|---|---|\n" + "\n".join(rows)
        return (*cells, table)

    first = models[0]
    with gr.Blocks(title=f"{title} demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}: one-step text-to-image by rectified flow")
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    model_dd = gr.Dropdown(labels, value=first.label, label="Model", elem_id="model")
                    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    steps = gr.Slider(1, 50, value=first.steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(1.0, 10.0, value=first.guidance, step=0.5, label="Guidance")
                    batch = gr.Slider(1, 8, value=1, step=1, label="Batch", elem_id="batch")
                    go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(
                        label="Images",
                        columns=4,
                        height=420,
                        object_fit="contain",
                        format="png",
                        elem_id="gallery",
                    )
                    timing = gr.Markdown(elem_id="timing")
                    lineage = gr.JSON(value=first.lineage, label="Lineage", elem_id="lineage")
            model_dd.change(pick, [model_dd], [steps, guidance, lineage], api_name=False)
            inputs = [prompt, seed, steps, guidance, batch, model_dd]
            go.click(generate, inputs, [gallery, timing, lineage], api_name="generate")
            prompt.submit(generate, inputs, [gallery, timing, lineage], api_name=False)
        with gr.Tab("Compare", id="compare"):
            gr.Markdown("The same prompt and the same noise (seed) through each model, side by side.")
            with gr.Row():
                c_prompt = gr.Textbox(label="Prompt", scale=3, elem_id="c-prompt")
                c_seed = gr.Number(label="Seed (the same noise for every model)", value=0, precision=0)
            slot_inputs: list[Any] = []
            with gr.Row():
                for i in range(MAX_COMPARE):
                    m = models[i] if i < len(models) else None
                    with gr.Column():
                        slot_inputs.append(
                            gr.Dropdown([NONE, *labels], value=m.label if m else NONE, label=f"Model {i + 1}")
                        )
                        slot_inputs.append(gr.Number(value=m.steps if m else 1, precision=0, label="Steps"))
                        slot_inputs.append(gr.Number(value=m.guidance if m else 1.0, label="Guidance"))
            c_go = gr.Button("Compare", variant="primary", elem_id="compare-btn")
            with gr.Row():
                c_imgs = [
                    gr.Image(label=f"slot {i + 1}", format="png", elem_id=f"cmp-{i}", interactive=False)
                    for i in range(MAX_COMPARE)
                ]
            c_table = gr.Markdown(elem_id="cmp-table")
            c_go.click(compare, [c_prompt, c_seed, *slot_inputs], [*c_imgs, c_table], api_name="compare")
    return demo


def launch(demo: Any, port: int, host: str = LOOPBACK, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the page until interrupted (one generation at a time: a model on one device)."""
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        footer_links=["api"],
        quiet=True,
        prevent_thread_lock=True,
    )
    if on_ready is not None:
        on_ready(f"http://{host}:{port}/")
    try:
        demo.block_thread()
    finally:
        demo.close()
