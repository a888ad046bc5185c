"""Caption curation: pure functions and streaming readers (no Prefect, no store)."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instaflow_core.config import CaptionSource, load
from instaflow_core.curation.filters import token_counter
from instaflow_core.curation.prompts import (
    Curator,
    blocklist_matcher,
    curate,
    language_matcher,
    near_key,
    normalize,
    prompt_id,
    split_of,
    whitespace_counter,
)
from instaflow_core.curation.readers import (
    detect_format,
    iter_caption_batches,
    resolve_paths,
    source_identity,
)
from instaflow_core.errors import ConfigError, DataError
from instaflow_core.models.tokenizer import tiny_tokenizer


# ------------------------------------------------------------------------------------------ normalise
def test_normalize_nfc_whitespace_controls():
    assert normalize("  Cafe\u0301\t\tau  lait \n") == "Café au lait"  # NFC composes e + combining acute
    assert normalize("a\x07b\x1bc") == "abc"
    assert normalize("a\u200bb\ufeff") == "ab"
    assert normalize("fish &amp; chips") == "fish & chips"
    assert normalize("line\r\nbreak") == "line break"
    assert normalize("\u00a0 \u2003 ") == ""
    assert normalize("bad\udcffbyte") == "badbyte"  # lone surrogate from a surrogateescape decode


def test_prompt_id_is_hash_of_normalized_text():
    a = prompt_id(normalize("A  cat"))
    assert a == prompt_id("A cat") and len(a) == 16
    assert a != prompt_id("a cat")
    assert int(a, 16) >= 0


def test_near_key():
    assert near_key("A cat, sitting!") == near_key("a cat sitting") == "a cat sitting"
    assert near_key("Ünïcode ÉTÉ") == "ünïcode été"


def test_blocklist_word_boundaries():
    m = blocklist_matcher(["ass", "c++", "red car"])
    assert m("what an ASS")
    assert not m("a classy bass")
    assert m("learn c++ today")
    assert m("a Red  car".replace("  ", " "))
    assert not m("a red carpet")
    assert not blocklist_matcher([])("anything")


def test_language_heuristic():
    en = language_matcher("en")
    assert en("a photo of a cat on the sofa")
    assert en("sunset beach")  # no stopwords: kept (documented limitation)
    assert not en("das ist ein Hund mit dem Ball")
    assert not en("le chat est sur la table avec une souris")
    assert not en("一只猫坐在沙发上")
    assert not en("12345")
    assert language_matcher(None)("一只猫")
    with pytest.raises(ConfigError, match="only 'en'"):
        language_matcher("de")


def test_split_deterministic_and_proportional():
    ids = [prompt_id(f"caption {i}") for i in range(4000)]
    s1 = [split_of(i, 0.1) for i in ids]
    assert s1 == [split_of(i, 0.1) for i in ids]
    frac = s1.count("holdout") / len(s1)
    assert 0.08 < frac < 0.12
    assert all(split_of(i, 0.0) == "train" for i in ids[:100])


# ------------------------------------------------------------------------------------------ tokens
def test_token_counter_hf_and_callable():
    tok = tiny_tokenizer()
    count = token_counter(tok)
    n = count(["a photo of a cat", ""])
    assert n[1] == 2  # start + end tokens only
    assert n[0] == len(tok("a photo of a cat")["input_ids"])
    long = " ".join(["photo"] * 100)
    assert count([long])[0] == 102  # counted without truncation
    assert token_counter(str.split)(["a b c"]) == [3]
    assert whitespace_counter(["a b c"]) == [5]


# ------------------------------------------------------------------------------------------ curator
def test_curate_counts_every_drop_reason():
    texts = [
        "a photo of a cat",
        "A photo of a cat",  # near duplicate
        "a photo of a cat",  # exact duplicate
        "a  photo of a cat ",  # same after normalisation: exact duplicate
        "",
        None,
        "ab",  # too short (chars)
        "dog",  # too few tokens (1 word + 2 < 4)
        " ".join(["word"] * 80),  # too many tokens
        "an nsfw picture",
        "das ist ein Hund mit dem Ball",
        "a red car on a street",
    ]
    rows, rep = curate(
        texts,
        min_chars=3,
        min_tokens=4,
        max_tokens=77,
        blocklist=["nsfw"],
        language="en",
        count_tokens=whitespace_counter,
    )
    assert [r.text for r in rows] == ["a photo of a cat", "a red car on a street"]
    assert rep.read == len(texts) and rep.kept == 2
    assert rep.dropped == Counter(
        empty=2,
        too_short=1,
        too_few_tokens=1,
        too_many_tokens=1,
        blocklist=1,
        language=1,
        duplicate=2,
        near_duplicate=1,
    )
    assert rep.kept + sum(rep.dropped.values()) == rep.read
    report_rows = rep.rows()
    assert {"stage": "filter", "reason": "duplicate", "count": 2} in report_rows
    assert {"stage": "total", "reason": "kept", "count": 2} in report_rows


def test_curator_dedupes_across_batches_and_max_prompts():
    cur = Curator(min_tokens=0, near_dedupe=False, max_prompts=3)
    a = cur.add(["one cat", "two cats", "Two cats"], "s1")
    b = cur.add(["one cat", "three cats", "four cats"], "s2")
    assert [r.text for r in a] == ["one cat", "two cats", "Two cats"]  # near dedupe off
    assert b == []  # "one cat" duplicate, then max_prompts reached
    assert cur.report.dropped["duplicate"] == 1 and cur.report.dropped["max_prompts"] == 2
    assert cur.report.per_source == {"s1": {"read": 3, "kept": 3}, "s2": {"read": 3, "kept": 0}}


def test_too_long_caption_does_not_shadow_its_valid_twin():
    cur = Curator(min_tokens=0, max_tokens=5, count_tokens=lambda ts: [len(t) for t in ts])
    cur.add(["a cat!!"], "s")  # 7 "tokens": dropped
    assert [r.text for r in cur.add(["a cat"], "s")] == [
        "a cat"
    ]  # near key equal, but the first was not kept


def test_flags_and_tiny_preset_curates_with_real_tokenizer():
    cfg = load("tiny")
    cur = Curator.from_config(cfg.curation, token_counter(tiny_tokenizer()))
    rows = cur.add(["Caf\u00e9 at  night", "3 dogs in a park"], "x")
    assert rows[0].flags == ("normalized", "non_ascii") and rows[1].flags == ("digits",)
    assert all(r.n_tokens >= 3 for r in rows)


# ------------------------------------------------------------------------------------------ readers
def _collect(src: CaptionSource, **kw):
    bad = Counter()
    out = [t for _, batch in iter_caption_batches(src, bad_rows=bad, **kw) for t in batch]
    return out, bad


def test_detect_format():
    assert detect_format("x/part-0.parquet") == "parquet"
    assert detect_format("caps.JSONL.gz") == "jsonl"
    assert detect_format("a.tsv") == "csv"
    assert detect_format("captions_val2017.json") == "coco"
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format("file.bin")


def test_txt_bad_rows_skip_and_error(tmp_path):
    p = tmp_path / "caps.txt"
    p.write_bytes(b"\xef\xbb\xbfa cat\nbad \xff\xfe bytes\nnul \x00 here\r\na dog\n")
    out, bad = _collect(CaptionSource(path=str(p)))
    assert out == ["a cat", "a dog"]
    assert bad == Counter(bad_encoding=1, nul_bytes=1)
    with pytest.raises(DataError, match=r"caps.txt: row 2: bad encoding"):
        _collect(CaptionSource(path=str(p)), on_bad_row="error")


def test_jsonl_csv_coco_and_gzip(tmp_path):
    j = tmp_path / "a.jsonl.gz"
    with gzip.open(j, "wt") as f:
        f.write(json.dumps({"caption": "a cat"}) + "\n{not json\n" + json.dumps({"caption": 3}) + "\n")
        f.write(json.dumps({"other": "x"}) + "\n" + json.dumps({"caption": "a dog"}) + "\n")
    out, bad = _collect(CaptionSource(path=str(j), column="caption"))
    assert out == ["a cat", "a dog"] and bad == Counter(bad_json=1, not_text=1, missing_field=1)

    c = tmp_path / "b.csv"
    c.write_bytes(b'id,TEXT\n1,"a cat, sitting"\n2,"multi\nline"\n3,bad \xff\n4,\n')
    out, bad = _collect(CaptionSource(path=str(c)))
    assert out == ["a cat, sitting", "multi\nline", ""] and bad == Counter(bad_encoding=1)

    coco = tmp_path / "captions_val2017.json"
    anns = [{"image_id": 1, "id": 10, "caption": "A man riding a horse."}, {"image_id": 2, "id": 11}]
    coco.write_text(json.dumps({"images": [], "annotations": anns}))
    out, bad = _collect(CaptionSource(path=str(coco)))
    assert out == ["A man riding a horse."] and bad == Counter(missing_field=1)


def test_missing_column_names_columns_present(tmp_path):
    pq.write_table(pa.table({"caption": ["a"], "url": ["u"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"no column 'TEXT' \(columns present: \['caption', 'url'\]\)"):
        _collect(CaptionSource(path=str(tmp_path / "x.parquet")))
    (tmp_path / "y.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"no column 'TEXT' \(columns present: \['a', 'b'\]\)"):
        _collect(CaptionSource(path=str(tmp_path / "y.csv")))
    (tmp_path / "z.jsonl").write_text('{"caption": "x"}\n')
    with pytest.raises(DataError, match=r"no field 'TEXT' \(fields present: \['caption'\]\)"):
        _collect(CaptionSource(path=str(tmp_path / "z.jsonl")))
    pq.write_table(pa.table({"TEXT": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match="holds int64, not text"):
        _collect(CaptionSource(path=str(tmp_path / "n.parquet")))


def test_missing_files_and_unreadable_file(tmp_path):
    with pytest.raises(DataError, match="caption source not found"):
        _collect(CaptionSource(path=str(tmp_path / "nope.txt")))
    with pytest.raises(DataError, match="matches no files"):
        _collect(CaptionSource(path=str(tmp_path / "raw" / "*.parquet")))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    out, bad = _collect(CaptionSource(path=str(tmp_path / "broken.parquet")))
    assert out == [] and bad == Counter(unreadable_file=1)
    with pytest.raises(DataError, match="broken.parquet: unreadable file"):
        _collect(CaptionSource(path=str(tmp_path / "broken.parquet")), on_bad_row="error")


def test_parquet_glob_streams_in_bounded_batches(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    n_files, rows_per_file = 3, 20_000
    for k in range(n_files):
        texts = [f"caption {k}-{i} " + "x" * 100 for i in range(rows_per_file)]
        texts[5] = "has \x00 nul"
        pq.write_table(
            pa.table({"TEXT": texts, "n": list(range(rows_per_file))}),
            raw / f"part-{k}.parquet",
            row_group_size=4096,
        )
    src = CaptionSource(path=str(raw / "*.parquet"))
    bad = Counter()
    tracemalloc.start()
    sizes, total = [], 0
    for _, batch in iter_caption_batches(src, batch_rows=1000, bad_rows=bad):
        sizes.append(len(batch))
        total += len(batch)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert max(sizes) == 1000 and total == n_files * (rows_per_file - 1)
    assert bad == Counter(nul_bytes=n_files)
    # ~7 MB of captions in all: the peak is a few batches, not the files
    assert peak < 4_000_000, peak


def test_relative_preset_path_and_source_identity(tmp_path, monkeypatch):
    from instaflow_core.config import load

    monkeypatch.chdir(tmp_path)  # the preset's bundled captions resolve from any folder
    source = load("tiny").curation.sources[0]
    fs, files = resolve_paths(source.path)
    assert len(files) == 1 and files[0].endswith("presets/data/tiny_captions.txt")
    ident = source_identity(source)
    assert ident[0]["size"] > 0
    with pytest.raises(DataError, match="not found"):
        resolve_paths("data/tiny_captions.txt")  # relative paths are the user's: from the working directory
    p = tmp_path / "c.txt"
    p.write_text("a\n")
    before = source_identity(CaptionSource(path=str(p)))
    p.write_text("a\nb\n")
    assert source_identity(CaptionSource(path=str(p))) != before
