"""The largest micro-batch that fits, with and without gradient checkpointing, for ours and the plain loop
(a section of gpu_suite.py's training rows: doubling 1, 2, 4 ... with two real steps each, OOM caught)."""

from __future__ import annotations

import time
from typing import Any

from suite_harness import Suite, free_memory, is_oom
from suite_train import Trainer, train_flops, train_row


def _raise(err: BaseException) -> dict:
    raise err


def search_micro(s: Suite, tr: Trainer, limit: int) -> tuple[int | None, str]:
    """The largest power-of-two micro-batch whose step (Adam state and EMA allocated) fits: OOM stops it."""
    ok, b, note = None, 1, f"limit {limit}"
    while b <= limit:
        batch = None
        try:
            batch = tr.synthetic(b)
            t0 = time.perf_counter()
            for _ in range(2):
                tr.step(batch)
            step_s = (time.perf_counter() - t0) / 2
            ok = b
            margin = 60 if s.device.type == "cuda" else 5  # what the rows after this one need at least
            if b * 2 <= limit and step_s * 2 * 14 > max(s.left() - margin, 0):  # a doubled row would not fit
                note = f"stopped at {b} for the time budget"
                break
        except RuntimeError as err:
            if not is_oom(err):
                raise
            note = f"OOM at {b}"
            tr.opt.zero_grad(set_to_none=True)
            break
        finally:
            del batch
            free_memory()
        b *= 2
    return ok, note


def train_search(s: Suite, st: Any) -> None:
    for kind in ("ours", "plain"):
        for gc in (False, True):
            name = f"{kind} largest micro, {'with' if gc else 'no'} grad ckpt"
            if s.args.quick:
                s.row("train", name, "samples/s", dict, est_s=0, skip="--quick")
                continue
            f = train_flops(s, st)
            top = min(s.preset.micro_limit, 256 if gc else 64)  # what an 80 GB card is expected to reach
            est = s.est(11 * top * f * (4 / 3 if gc else 1), fixed=10)  # the search's steps, then the row's
            if s.left() < est:
                s.row("train", name, "samples/s", dict, est_s=est)  # a skipped row
                continue
            tr = Trainer(s, st, kind, gradient_checkpointing=gc)
            try:
                m, why = search_micro(s, tr, s.preset.micro_limit)
            except Exception as err:  # a row of its own, so the run goes on
                s.row("train", name, "samples/s", lambda err=err: _raise(err), est_s=0)
                tr.close()
                continue
            if m is None:
                s.row(
                    "train",
                    name,
                    "samples/s",
                    lambda why=why: {"note": f"micro-batch 1 does not fit ({why})"},
                    est_s=0,
                )
            else:
                vs = f"plain largest micro, {'with' if gc else 'no'} grad ckpt" if kind == "ours" else None
                r = train_row(s, tr, name, m, vs=vs, note=f"micro {m} ({why})")
                if r.status == "error" and r.note.startswith("OOM") and m > 1:  # real batches need a bit more
                    s.rows.remove(r)
                    train_row(
                        s, tr, name, m // 2, vs=vs, note=f"micro {m // 2} ({why}; {m} OOMed on real data)"
                    )
            tr.close()
