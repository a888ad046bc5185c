"""A T5 tokenizer built locally (no sentencepiece, no download), saved as FLUX's `tokenizer_2/` / SD3's `tokenizer_3/`.

The real folders (google/t5-v1_1-xxl's tokenizer, saved by transformers 4.4x) hold `spiece.model` (the SentencePiece
Unigram model), `tokenizer.json` (its `tokenizers` conversion), `tokenizer_config.json` and
`special_tokens_map.json`; `model_index.json` names the class `T5TokenizerFast` (in transformers 5 an alias of
`T5Tokenizer`, which reads tokenizer.json). This module writes the same four files over a small vocabulary:

- Layout of the ids as T5's: `<pad>` 0, `</s>` 1, `<unk>` 2, the SentencePiece pieces by descending score, then the
  100 sentinels `<extra_id_99>` ... `<extra_id_0>` (reversed, as T5's 32000..32099) as special added tokens.
- The pieces are word pieces of the committed CLIP BPE (`instaflow_core/models/assets/tiny_clip`): a word-final CLIP
  token `photo</w>` becomes the word-initial piece `▁photo`, an inner one stays `ph`; every printable ASCII character
  is a piece too (so ordinary captions never hit `<unk>`). Scores are log-Zipf in the BPE merge order (earlier
  merge = more frequent = higher score), so Viterbi prefers whole words, as a trained model does.
- `tokenizer.json` is built with the `tokenizers` library directly: Unigram(unk_id=2), the normalizer transformers'
  `SpmConverter` writes for a SentencePiece model without a precompiled charsmap (strip right, runs of spaces ->
  `▁`), Metaspace pre-tokenizer/decoder (prepend_scheme "always"), post-processor `$A </s>` / `$A </s> $B </s>`.
- `spiece.model` IS written: a `sentencepiece.ModelProto` serialized with protobuf (the schema transformers ships in
  `transformers.utils.sentencepiece_model_pb2_new`), same pieces / scores / ids, piece types CONTROL / UNKNOWN /
  NORMAL, trainer_spec as T5's (UNIGRAM, pad 0, eos 1, unk 2, no bos). Two differences from the real file, both
  because sentencepiece is not installed here: its normalizer is `identity` with an empty `precompiled_charsmap`
  (T5's is `nmt_nfkc`, a compiled NFKC trie only sentencepiece's trainer can build; no NFKC folding, so e.g.
  full-width letters become `<unk>`), and it was never opened by sentencepiece itself. What is checked instead:
  transformers' own `T5Converter` (the spiece.model -> tokenizer.json path, which needs only protobuf) turns it into
  a tokenizer that gives the same ids as tokenizer.json (`spiece_model_matches`).

Deterministic (no randomness at all); ~0.1 s to build.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from instaflow_core.models.tokenizer import TINY_CLIP_DIR

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPIECE = "▁"  # U+2581, SentencePiece's whitespace marker
N_PIECES = 2000  # pieces incl. the 3 specials (T5: 32000)
EXTRA_IDS = 100  # sentinels, as T5
MODEL_MAX_LENGTH = (
    512  # tokenizer_config.json of FLUX / SD3 (their pipelines truncate to max_sequence_length)
)
_N_CLIP_BYTE_TOKENS = 512


def t5_vocab(n_pieces: int = N_PIECES) -> list[tuple[str, float]]:
    """The SentencePiece part of the vocabulary, `(piece, score)` by id: 3 specials, then by descending score."""
    clip = json.loads((TINY_CLIP_DIR / "vocab.json").read_text())
    merged = sorted(clip, key=clip.__getitem__)[_N_CLIP_BYTE_TOKENS:]
    chars = [c for c in string.printable if not c.isspace()]
    # every character alone and word-initial: no ASCII caption ever needs <unk>
    scored: dict[str, float] = {
        SPIECE: -8.0,
        **{SPIECE + c: -13.0 for c in chars},
        **{c: -14.0 for c in chars},
    }
    for rank, token in enumerate(merged):
        word_final = token.endswith("</w>")
        piece = SPIECE + token[: -len("</w>")] if word_final else token
        if token.startswith("<|") or not token.isascii() or piece in scored:
            continue
        scored[piece] = round(-3.0 - math.log(rank + 2) - (0.0 if word_final else 1.0), 4)
    if n_pieces - 3 > len(scored) or n_pieces - 3 < 1 + 2 * len(chars):
        raise ValueError(f"n_pieces={n_pieces}: must be between {4 + 2 * len(chars)} and {len(scored) + 3}")
    by_score = sorted(scored.items(), key=lambda kv: -kv[1])
    kept = [kv for kv in by_score if kv[1] > -13.0][: n_pieces - 4 - 2 * len(chars)]
    pieces = sorted(
        kept + [kv for kv in by_score if kv[1] <= -13.0 or kv[0] == SPIECE], key=lambda kv: -kv[1]
    )
    return [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), *pieces]


def sentinels(extra_ids: int = EXTRA_IDS) -> list[str]:
    """`<extra_id_N>` in id order (T5 puts `<extra_id_99>` first)."""
    return [f"<extra_id_{i}>" for i in range(extra_ids - 1, -1, -1)]


def build_tokenizer_json(vocab: list[tuple[str, float]], extra_ids: int = EXTRA_IDS):
    """The `tokenizers.Tokenizer` of tokenizer.json (see the module docstring for each part)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(
        Unigram([*vocab, *((s, 0.0) for s in sentinels(extra_ids))], unk_id=2, byte_fallback=False)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), SPIECE)]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=SPIECE, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", EOS], pair=["$A", EOS, "$B", EOS], special_tokens=[(EOS, 1)]
    )
    specials = [PAD, EOS, UNK, *sentinels(extra_ids)]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return tok


def spiece_model_bytes(vocab: list[tuple[str, float]]) -> bytes:
    """`spiece.model`: the vocabulary as a serialized sentencepiece ModelProto (T5's trainer settings)."""
    from transformers.convert_slow_tokenizer import import_protobuf

    pb = import_protobuf()
    model = pb.ModelProto()
    kinds = {PAD: pb.ModelProto.SentencePiece.CONTROL, EOS: pb.ModelProto.SentencePiece.CONTROL}
    kinds[UNK] = pb.ModelProto.SentencePiece.UNKNOWN
    for piece, score in vocab:
        entry = model.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = kinds.get(piece, pb.ModelProto.SentencePiece.NORMAL)
    ts = model.trainer_spec
    ts.model_type = pb.TrainerSpec.UNIGRAM
    ts.vocab_size = len(vocab)
    ts.model_prefix = "spiece"
    ts.character_coverage = 1.0
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 2, -1, 1, 0
    ts.unk_piece, ts.eos_piece, ts.pad_piece = UNK, EOS, PAD
    ns = model.normalizer_spec
    ns.name = "identity"  # T5: nmt_nfkc + its precompiled charsmap (see the module docstring)
    ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = True, True, True
    return model.SerializeToString()


def _added(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_configs(
    n_pieces: int, extra_ids: int = EXTRA_IDS, model_max_length: int = MODEL_MAX_LENGTH
) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json as transformers 4.4x wrote them for T5 v1.1."""
    decoder = {str(i): {**_added(t), "special": True} for i, t in enumerate((PAD, EOS, UNK))}
    for i, token in enumerate(sentinels(extra_ids)):
        decoder[str(n_pieces + i)] = {**_added(token), "special": True}
    extra = [f"<extra_id_{i}>" for i in range(extra_ids)]
    config = {
        "add_prefix_space": True,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": EOS,
        "extra_ids": extra_ids,
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": UNK,
    }
    special_map = {
        "additional_special_tokens": extra,
        "eos_token": _added(EOS),
        "pad_token": _added(PAD),
        "unk_token": _added(UNK),
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


def write_t5_tokenizer(
    folder: str | Path,
    *,
    n_pieces: int = N_PIECES,
    extra_ids: int = EXTRA_IDS,
    model_max_length: int = MODEL_MAX_LENGTH,
    spiece_model: bool = True,
) -> Path:
    """Write spiece.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = t5_vocab(n_pieces)
    build_tokenizer_json(vocab, extra_ids).save(str(folder / "tokenizer.json"))
    if spiece_model:
        (folder / "spiece.model").write_bytes(spiece_model_bytes(vocab))
    for name, cfg in tokenizer_configs(len(vocab), extra_ids, model_max_length).items():
        (folder / name).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return folder


def vocab_size(n_pieces: int = N_PIECES, extra_ids: int = EXTRA_IDS) -> int:
    """Tokens the tokenizer can emit (T5: 32100); the T5 config's `vocab_size` rounds it up to a multiple of 128."""
    return n_pieces + extra_ids


def padded_vocab_size(n_pieces: int = N_PIECES, extra_ids: int = EXTRA_IDS) -> int:
    """The embedding rows of the T5 encoder (T5 v1.1: 32128 = 32100 rounded up to a multiple of 128)."""
    return -(-vocab_size(n_pieces, extra_ids) // 128) * 128


def spiece_model_matches(folder: str | Path, texts: list[str]) -> bool:
    """Whether transformers' `T5Converter` reading `spiece.model` (protobuf only) tokenises `texts` to the same ids
    as the folder's tokenizer.json."""
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import T5Converter

    folder = Path(folder)
    from_json = Tokenizer.from_file(str(folder / "tokenizer.json"))
    extra = int(json.loads((folder / "tokenizer_config.json").read_text())["extra_ids"])
    fake_slow = SimpleNamespace(
        vocab_file=str(folder / "spiece.model"),
        _extra_ids=extra,
        add_prefix_space=True,
        legacy=True,
        special_tokens=[],
        convert_tokens_to_ids=from_json.token_to_id,
    )
    from_spm = T5Converter(fake_slow).converted()
    return all(from_spm.encode(t).ids == from_json.encode(t).ids for t in texts)
