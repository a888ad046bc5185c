"""The paper's table in miniature, its claims as checks, and the labelled comparison grid.

`paper_table(rows, reference)` turns the evaluation rows into one line per (model, Euler steps): the teacher
(a pretrained 1-RF at each of evaluation.rf_steps), the 2-RF at the same steps, InstaFlow (distill(2-RF)) at one
step, the control distill(1-RF) at one step, with the Frechet distance and prompt alignment under the names
the networks give them, straightness for the flows, and the real-vs-real floor. `paper_checks` states the
InstaFlow paper's claims on those numbers (what the digits benchmark and its CI test assert).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from instaflow_core.evaluation.names import column_names

MODEL_LABELS = {  # row-name prefix -> what the paper calls it
    "1rf": "1-RF (teacher)",
    "2rf": "2-RF",
    "instaflow": "InstaFlow = distill(2-RF)",
    "control": "distill(1-RF) (control)",
    "teacher": "teacher",
}


def _split_name(name: str) -> tuple[str, int]:
    prefix, _, steps = name.rpartition("_")
    return prefix, int(steps.removesuffix("step")) if steps.endswith("step") else 0


def paper_table(
    rows: Sequence[dict[str, Any]], reference: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One line per evaluated setting, in the paper's order, plus the floor line when the reference has one."""
    if not rows:
        return []
    nets = rows[0].get("networks", {})
    fd, align = column_names(nets)
    order = list(MODEL_LABELS)
    keyed = sorted(
        rows, key=lambda r: (order.index(p) if (p := _split_name(r["name"])[0]) in order else 99, r["steps"])
    )
    seen: set[str] = set()
    out = []
    for r in keyed:
        prefix, _ = _split_name(r["name"])
        first = prefix not in seen
        seen.add(prefix)
        flow = prefix in ("1rf", "2rf")
        out.append(
            {
                "model": MODEL_LABELS.get(prefix, prefix),
                "steps": r["steps"],
                fd: round(float(r["fid"]), 4),
                align: round(float(r["clip_score"]), 4),
                "straightness": round(float(r["straightness"]), 5)
                if flow and first and r.get("straightness") is not None
                else None,
            }
        )
    if reference and reference.get("floor") is not None:
        out.append(
            {
                "model": "real train images (floor)",
                "steps": None,
                fd: round(float(reference["floor"]), 4),
                align: None,
                "straightness": None,
            }
        )
    return out


def metric_of(rows: Sequence[dict[str, Any]], name: str, key: str = "fid") -> float | None:
    row = next((r for r in rows if r["name"] == name), None)
    return None if row is None or row.get(key) is None else float(row[key])


def paper_checks(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims on these rows (those whose rows exist): reflow straightens the flow, the straight
    2-RF makes better one-step samples, InstaFlow comes near the teacher's many-step quality, and distilling
    the 2-RF beats distilling the 1-RF at the same budget."""
    steps = sorted({r["steps"] for r in rows if r["name"].startswith("1rf_")})
    last = steps[-1] if steps else None
    s1 = metric_of(rows, "1rf_1step", "straightness")
    s2 = metric_of(rows, "2rf_1step", "straightness")
    one1, one2 = metric_of(rows, "1rf_1step"), metric_of(rows, "2rf_1step")
    teacher_n = metric_of(rows, f"1rf_{last}step") if last else None
    insta, control = metric_of(rows, "instaflow_1step"), metric_of(rows, "control_1step")
    claims = [
        ("straightness(2-RF) <= 0.2 x straightness(1-RF)", s2, s1, lambda a, b: a <= 0.2 * b),
        ("1-step FD(2-RF) <= 0.35 x 1-step FD(1-RF)", one2, one1, lambda a, b: a <= 0.35 * b),
        (f"InstaFlow 1-step FD <= 2 x teacher {last}-step FD", insta, teacher_n, lambda a, b: a <= 2 * b),
        ("distill(2-RF) < distill(1-RF), 1-step FD at one budget", insta, control, lambda a, b: a < b),
    ]
    return [
        {"claim": c, "value": round(a, 5), "against": round(b, 5), "holds": bool(f(a, b))}
        for c, a, b, f in claims
        if a is not None and b is not None
    ]


def labelled_grid(
    rows: Sequence[np.ndarray], row_labels: Sequence[str], col_labels: Sequence[str], tile: int = 48
) -> np.ndarray:
    """uint8 image: row r is `rows[r]` (n, H, W, 3) upscaled to `tile` px (nearest), row labels on the left,
    column labels on top, white background."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    pad, label_w, head_h = 4, 6 * max(len(s) for s in row_labels) + 12, 16
    n = max(len(r) for r in rows)
    canvas = Image.new(
        "RGB", (label_w + n * (tile + pad) + pad, head_h + len(rows) * (tile + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels[:n]):
        draw.text(
            (label_w + pad + c * (tile + pad) + tile // 2 - 3 * len(text), 2), text, fill="black", font=font
        )
    for r, (images, label) in enumerate(zip(rows, row_labels, strict=True)):
        y = head_h + pad + r * (tile + pad)
        draw.text((4, y + tile // 2 - 5), label, fill="black", font=font)
        for c, img in enumerate(images):
            tile_img = Image.fromarray(np.asarray(img, np.uint8)).resize((tile, tile), Image.NEAREST)
            canvas.paste(tile_img, (label_w + pad + c * (tile + pad), y))
    return np.asarray(canvas)
