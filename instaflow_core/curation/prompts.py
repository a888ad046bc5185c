"""Caption curation as pure functions: normalise, count tokens, filter, dedupe, split.

Nothing here does I/O. `Curator` holds the only state a streaming curation needs (the dedupe sets and the
report); feed it batches of raw captions in source order and it returns the rows to keep. The same inputs in
the same order always give the same rows, ids and splits.

Choices (documented because they are choices):
- prompt_id = sha256(normalised text)[:16] (64 bits: collision odds ~1e-5 at 10^7 prompts).
- Near-dedupe by a normalised-text key (casefold, punctuation, symbols and underscores replaced by spaces,
  whitespace collapsed) rather than MinHash: one 64-bit hash per kept prompt, O(1) per caption, no false positives across unrelated
  captions. It catches "A cat." / "a cat!" / "A  CAT" but not reworded captions; MinHash would, at ~100x the
  CPU per caption and with tuning (shingle size, bands) that changes what "near" means.
- Dedupe memory grows with the number of *kept unique* prompts (~100 bytes each in Python sets), never with
  the size of the inputs. Beyond ~10^8 prompts, curate in shards and let the table merge dedupe exactly.
- Language filter "en" is a heuristic, not a classifier: captions whose letters are mostly non-ASCII, or that
  contain more stopwords of another common Latin-script language (de, fr, es, it, pt, nl) than English ones,
  are dropped. It cannot tell English from e.g. Indonesian or Swahili, and keeps stopword-free Latin-script
  titles ("Nike Air Max 90") whatever their language.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from instaflow_core.curation.filters import (
    TokenCounter,
    blocklist_matcher,
    language_matcher,
    row_flags,
    whitespace_counter,
)

# Drop reasons, in the order the filters run (the report lists them in this order).
DROP_REASONS = (
    "empty",
    "too_short",
    "too_few_tokens",
    "too_many_tokens",
    "blocklist",
    "language",
    "duplicate",
    "near_duplicate",
    "max_prompts",
)

# Invisible format characters that only make equal captions hash differently (zero-width space/joiners,
# direction marks, BOM, soft hyphen, word joiner).
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\ufeff\u00ad"), None)
_WS_RE = re.compile(r"\s+")
# Control characters, lone surrogates (from undecodable bytes) and private-use code points.
_BAD_CATS = frozenset({"Cc", "Cs", "Co"})


def normalize(text: str) -> str:
    """Unicode NFC, HTML entities decoded, control/invisible characters removed, whitespace collapsed."""
    if "&" in text:
        text = html.unescape(text)  # web captions carry &amp; &quot; ...
    text = unicodedata.normalize("NFC", text)
    text = text.translate(_INVISIBLE)
    if not text.isprintable():
        # Control characters (Cc), lone surrogates (Cs) and private-use (Co) go; whitespace controls become spaces.
        text = "".join(
            " " if ch.isspace() else ch
            for ch in text
            if ch.isspace() or unicodedata.category(ch) not in _BAD_CATS
        )
    return _WS_RE.sub(" ", text).strip()


def prompt_id(normalized_text: str) -> str:
    """The id of a prompt: first 16 hex of sha256 of its normalised text."""
    return hashlib.sha256(normalized_text.encode("utf-8")).hexdigest()[:16]


_NON_WORD_RE = re.compile(r"[\W_]+")  # punctuation, symbols, whitespace (Unicode-aware)


def near_key(normalized_text: str) -> str:
    """The near-dedupe key: casefolded, punctuation/symbols dropped, whitespace collapsed."""
    return _NON_WORD_RE.sub(" ", normalized_text.casefold()).strip()


def _h64(s: str) -> int:
    # Dedupe sets live for one process only, so Python's (per-process salted, 64-bit SipHash) string hash is
    # enough and ~10x cheaper than a cryptographic digest; prompt ids use sha256.
    return hash(s)


def split_of(pid: str, holdout_fraction: float) -> str:
    """Deterministic split from the prompt id: 'holdout' for a `holdout_fraction` share of ids, else 'train'."""
    # The id is already a uniform hash; salting keeps the split independent of any other use of the id bits.
    u = int.from_bytes(hashlib.sha256(b"split:" + pid.encode()).digest()[:8], "big") / 2.0**64
    return "holdout" if u < holdout_fraction else "train"


# ------------------------------------------------------------------------------------------- report
@dataclass
class CurationReport:
    """Counts of what a curation read, kept and dropped (per reason), and bad input rows (per reason)."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count (DROP_REASONS)
    bad_rows: Counter = field(
        default_factory=Counter
    )  # reader reason -> count (nul_bytes, bad_encoding, ...)
    per_source: dict = field(default_factory=dict)  # source -> {"read": n, "kept": n}
    splits: Counter = field(default_factory=Counter)  # split -> kept count

    def total_dropped(self) -> int:
        return sum(self.dropped.values()) + sum(self.bad_rows.values())

    def bad_fraction(self) -> float:
        """Bad input rows over all rows read (good ones reached the filters, bad ones did not)."""
        bad = sum(self.bad_rows.values())
        return bad / (self.read + bad) if self.read + bad else 0.0

    def summary(self) -> str:
        """One line of counts per reason: read, kept, dropped by filter, bad input rows."""

        def listed(counts: dict[str, int]) -> str:
            return ", ".join(f"{k} {v:,}" for k, v in counts.items() if v) or "none"

        dropped = {r: int(self.dropped[r]) for r in DROP_REASONS}
        bad = sum(self.bad_rows.values())
        return (
            f"read {self.read + bad:,}, kept {self.kept:,}; dropped: {listed(dropped)}; "
            f"bad rows: {listed(dict(sorted(self.bad_rows.items())))}"
        )

    def rows(self) -> list[dict[str, Any]]:
        """Rows for a table artifact: one per reason with a non-zero count, then totals."""
        out = [
            {"stage": "filter", "reason": r, "count": int(self.dropped[r])}
            for r in DROP_REASONS
            if self.dropped[r]
        ]
        out += [{"stage": "read", "reason": r, "count": int(n)} for r, n in sorted(self.bad_rows.items())]
        out += [
            {"stage": "total", "reason": "read", "count": self.read},
            {"stage": "total", "reason": "kept", "count": self.kept},
            {"stage": "total", "reason": "dropped", "count": self.total_dropped()},
        ]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CurationReport:
        """The inverse of `to_dict` (the report recorded in the prompts table's metadata)."""
        return cls(
            read=int(d.get("read", 0)),
            kept=int(d.get("kept", 0)),
            dropped=Counter(d.get("dropped") or {}),
            bad_rows=Counter(d.get("bad_rows") or {}),
            per_source=dict(d.get("per_source") or {}),
            splits=Counter(d.get("splits") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "bad_rows": dict(self.bad_rows),
            "per_source": self.per_source,
            "splits": dict(self.splits),
        }


@dataclass(frozen=True)
class PromptRow:
    prompt_id: str
    text: str
    source: str
    split: str
    n_tokens: int
    flags: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "text": self.text,
            "source": self.source,
            "split": self.split,
            "n_tokens": self.n_tokens,
            "flags": list(self.flags),
        }


# The `prompts` table: one row per kept prompt, keyed by prompt_id.
PROMPTS_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("split", pa.string()),
        pa.field("n_tokens", pa.int32()),
        pa.field("flags", pa.list_(pa.string())),
    ]
)


def rows_to_arrow(rows: Sequence[PromptRow]) -> pa.Table:
    """PromptRows -> an Arrow table with PROMPTS_SCHEMA."""
    return pa.Table.from_arrays(
        [
            pa.array([r.prompt_id for r in rows], pa.string()),
            pa.array([r.text for r in rows], pa.string()),
            pa.array([r.source for r in rows], pa.string()),
            pa.array([r.split for r in rows], pa.string()),
            pa.array([r.n_tokens for r in rows], pa.int32()),
            pa.array([list(r.flags) for r in rows], pa.list_(pa.string())),
        ],
        schema=PROMPTS_SCHEMA,
    )


# ------------------------------------------------------------------------------------------- curator
class Curator:
    """Streaming curation: `add(texts, source)` per batch returns the rows kept from it.

    The filters run cheapest first (length, blocklist, language, exact and near dedupe) so the tokenizer only
    sees captions that could still be kept.
    """

    def __init__(
        self,
        *,
        min_chars: int = 3,
        min_tokens: int = 0,
        max_tokens: int = 77,
        near_dedupe: bool = True,
        blocklist: Sequence[str] = (),
        language: str | None = None,
        holdout_fraction: float = 0.0,
        max_prompts: int | None = None,
        count_tokens: TokenCounter | None = None,
    ) -> None:
        self.min_chars = min_chars
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens
        self.near_dedupe = near_dedupe
        self.holdout_fraction = holdout_fraction
        self.max_prompts = max_prompts
        self.count_tokens = count_tokens or whitespace_counter
        self._blocked = blocklist_matcher(blocklist)
        self._lang_ok = language_matcher(language)
        self._seen: set[int] = set()
        self._seen_near: set[int] = set()
        self.report = CurationReport()

    @classmethod
    def from_config(cls, curation: Any, count_tokens: TokenCounter | None = None) -> Curator:
        """Build from a `CurationConfig` section."""
        return cls(
            min_chars=curation.min_chars,
            min_tokens=curation.min_tokens,
            max_tokens=curation.max_tokens,
            near_dedupe=curation.near_dedupe,
            blocklist=curation.blocklist,
            language=curation.language,
            holdout_fraction=curation.holdout_fraction,
            max_prompts=curation.max_prompts,
            count_tokens=count_tokens,
        )

    @property
    def full(self) -> bool:
        return self.max_prompts is not None and self.report.kept >= self.max_prompts

    def add(self, texts: Iterable[str | None], source: str) -> list[PromptRow]:
        rep = self.report
        src = rep.per_source.setdefault(source, {"read": 0, "kept": 0})
        candidates: list[tuple[str, str, int, int | None]] = []  # (raw, normalised, text hash, near-key hash)
        pending_ids: set[int] = set()  # dedupe within this batch before the tokenizer runs
        pending_near: set[int] = set()
        for raw in texts:
            rep.read += 1
            src["read"] += 1
            text = normalize(raw) if raw else ""
            if not text:
                rep.dropped["empty"] += 1
                continue
            if len(text) < self.min_chars:
                rep.dropped["too_short"] += 1
                continue
            if self._blocked(text):
                rep.dropped["blocklist"] += 1
                continue
            if not self._lang_ok(text):
                rep.dropped["language"] += 1
                continue
            h = _h64(text)
            if h in self._seen or h in pending_ids:
                rep.dropped["duplicate"] += 1
                continue
            k = None
            if self.near_dedupe:
                k = _h64(near_key(text))
                if k in self._seen_near or k in pending_near:
                    rep.dropped["near_duplicate"] += 1
                    continue
                pending_near.add(k)
            pending_ids.add(h)
            candidates.append((raw or "", text, h, k))

        counts = self.count_tokens([c[1] for c in candidates])
        kept: list[PromptRow] = []
        for (raw, text, h, k), n in zip(candidates, counts, strict=True):
            if n < self.min_tokens:
                rep.dropped["too_few_tokens"] += 1
                continue
            if n > self.max_tokens:
                rep.dropped["too_many_tokens"] += 1
                continue
            if self.full:
                rep.dropped["max_prompts"] += 1
                continue
            # Only kept prompts enter the dedupe sets: a too-long caption must not shadow a later valid twin.
            self._seen.add(h)
            if k is not None:
                self._seen_near.add(k)
            pid = prompt_id(text)
            split = split_of(pid, self.holdout_fraction)
            kept.append(PromptRow(pid, text, source, split, int(n), tuple(row_flags(raw, text))))
            rep.kept += 1
            rep.splits[split] += 1
            src["kept"] += 1
        return kept


def curate(
    texts: Iterable[str | None],
    *,
    source: str = "inline",
    count_tokens: TokenCounter | None = None,
    **options: Any,
) -> tuple[list[PromptRow], CurationReport]:
    """Curate an in-memory list of captions in one call (tests, notebooks)."""
    cur = Curator(count_tokens=count_tokens, **options)
    rows = cur.add(texts, source)
    return rows, cur.report
