"""The tiny CLIP tokenizer: real CLIP BPE (first 4000 merges), committed with the package, no download.

`assets/tiny_clip/` holds `vocab.json` + `merges.txt` made by `assets/make_tiny_clip_vocab.py`; the ids of common
words equal the real CLIP ids (e.g. "photo" -> 1125), so captions tokenise into sensible word pieces and the
curation stage can count tokens with the same tokenizer the tiny teacher uses.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from instaflow_core.errors import ConfigError

TINY_CLIP_DIR = Path(__file__).resolve().parent / "assets" / "tiny_clip"
TINY_CLIP_MERGES = 4000  # how many merges the committed files hold
CLIP_MAX_LENGTH = 77  # CLIP's text context
_N_BYTE_TOKENS = 512  # 256 byte characters + their 256 "</w>" variants


def tiny_tokenizer(n_merges: int = TINY_CLIP_MERGES) -> CLIPTokenizer:
    """A CLIPTokenizer over the first `n_merges` CLIP merges; vocab size = 512 + n_merges + 2."""
    if not 0 <= n_merges <= TINY_CLIP_MERGES:
        raise ConfigError(
            f"models.tiny.vocab_merges={n_merges}: must be between 0 and {TINY_CLIP_MERGES} "
            "(rerun instaflow_core/models/assets/make_tiny_clip_vocab.py --merges N for more)"
        )
    if n_merges == TINY_CLIP_MERGES:
        return CLIPTokenizer(
            str(TINY_CLIP_DIR / "vocab.json"),
            str(TINY_CLIP_DIR / "merges.txt"),
            model_max_length=CLIP_MAX_LENGTH,
        )
    # Fewer merges: keep the byte tokens and the first n merge results, then the two specials (CLIP's order).
    full = json.loads((TINY_CLIP_DIR / "vocab.json").read_text())
    by_id = sorted(full, key=full.__getitem__)
    tokens = by_id[: _N_BYTE_TOKENS + n_merges] + ["<|startoftext|>", "<|endoftext|>"]
    lines = (TINY_CLIP_DIR / "merges.txt").read_text().split("\n")[1 : 1 + n_merges]
    merges = [tuple(line.split()) for line in lines]
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, model_max_length=CLIP_MAX_LENGTH
    )
