"""What to call a metric on screen: by the network that computed it, unless the real one ran.

A Frechet distance in random tiny-CLIP features is not FID, and a cosine between random-CLIP embeddings is not
a CLIP score: tables head them `FD(tiny-CLIP)` and `cos(tiny-CLIP)`. Only paper-comparable networks (the FID
Inception, real CLIP weights) earn `FID` and `CLIP`. The results and MLflow keep their internal keys (`fid`,
`clip_score`); only the displayed headers change.
"""

from __future__ import annotations

from typing import Any

STAND_IN_MARK = "not paper-comparable"

# evaluation.fid_features / clip_model names an experiment provides -> its module (`networks(store, eval_set,
# section)`): networks the evaluation trains itself, so there are no weights to find (the preflight skips them)
EXPERIMENT_NETWORKS = {"digits-classifier": "instaflow_core.experiments.digits.classifier"}


def short_name(label: str) -> str:
    """A network label (feature_nets: 'tiny-random CLIP (seed 0; stand-in, ...)') -> 'tiny-CLIP'."""
    text = (label or "").strip()
    if text.startswith("tiny-random CLIP"):
        return "tiny-CLIP"
    for prefix in ("DINOv2", "Inception", "CLIP"):
        if text.startswith(prefix):
            return prefix
    return text.split(" ", 1)[0] or "?"


def _comparable(networks: dict[str, Any], key: str, label: str) -> bool:
    flag = networks.get(key)
    if flag is None:  # from MLflow tags, which keep the label only
        return bool(label) and STAND_IN_MARK not in label and "not FID" not in label
    return bool(flag)


def metric_headers(networks: dict[str, Any] | None) -> tuple[str, str]:
    """(header of the Frechet distance column, header of the CLIP score column) for these networks.

    `networks` is the evaluation's `describe_networks` dict (or `fid_features` / `clip_model` labels alone).
    """
    networks = networks or {}
    fid_label = str(networks.get("fid_features", ""))
    clip_label = str(networks.get("clip_model", ""))
    if not fid_label and not clip_label:
        return "FD(?)", "cos(?)"
    fid = (
        "FID" if _comparable(networks, "fid_paper_comparable", fid_label) else f"FD({short_name(fid_label)})"
    )
    if _comparable(networks, "clip_paper_comparable", clip_label):
        clip = "CLIP"
    else:
        clip = f"cos({short_name(clip_label)})"
    return fid, clip


def column_names(networks: dict[str, Any] | None) -> tuple[str, str]:
    """The two metric columns' names: the networks' own (`fid_metric` / `clip_metric`, e.g. the digits
    classifier's), else `metric_headers`."""
    networks = networks or {}
    fd, clip = metric_headers(networks)
    return str(networks.get("fid_metric") or fd), str(networks.get("clip_metric") or clip)
