"""Text conditions, computed once: each prompt's `Condition` under one set of text encoders, in the store.

T5-XXL alone has 4.7B parameters: running it at every training step would cost more than the student. So the
pair-making flow encodes every planned prompt once (plus "" for caption dropout and guidance, and the negative
prompt) into a Lance table of the store, and training reads the conditions by prompt from it, with the text
encoders never loaded into training memory.

    table   conditions-<encoder id>: one table per set of text encoders (their shapes are fixed), keyed by
            `key` = curation's prompt_id of the text (the id the prompts table gives it; "" has one too)
    columns key, text, and one fixed-shape tensor column per Condition field: embeds, pooled, mask, extra.<name>
    encoder identity   a hash over the text encoders' and tokenizers' files (`encoder_identity`): a hub
            snapshot's blob names (their sha256) or the files' bytes; a student folder records its base's, since
            `save_student` copies the encoders unchanged, so the 2-RF's distillation pairs reuse the teacher's rows

Bytes per prompt (float32 by default, `generation.conditions_dtype: float16` halves it): SD 1.5 77 x 768 = 236 KB,
SDXL 77 x 2048 + 1280 + 6 = 636 KB, SD 3.5 (77 + 256) x 4096 + 2048 = 5.5 MB, FLUX.1-dev 512 x 4096 + 768 = 8.4 MB
(`ConditionTable.bytes_per_prompt` reports the real number of a table).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from instaflow_core.curation.prompts import prompt_id
from instaflow_core.errors import DataError
from instaflow_core.models.family import STAGE_META, Condition, Model
from instaflow_core.refs import TableRef
from instaflow_core.store import (
    Store,
    create_table,
    get_metadata,
    merge_rows,
    open_ref,
    open_table,
    table_ref,
)
from instaflow_core.store.commits import key_field
from instaflow_core.store.tables import from_tensor_column, tensor_field, tensor_shape, to_tensor_column

log = logging.getLogger("instaflow.generation.conditions")

KEY = "key"
META_KEY = "conditions"  # in a pairs table's metadata: the conditions table ref (JSON) of its prompts
ENCODER_META = "text_encoders_id"  # in a saved folder's instaflow.json: its encoders' identity
_TEXT_PARTS = re.compile(r"^(text_encoder|tokenizer)(_\d+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}
FP16_MAX = 65504.0
SCALAR = b"instaflow.scalar"


def encoder_identity(folder: Path) -> str:
    """16 hex chars identifying a model folder's text encoders and tokenizers (what a condition depends on)."""
    meta = Path(folder) / STAGE_META
    if meta.is_file():
        recorded = json.loads(meta.read_text()).get(ENCODER_META)
        if recorded:
            return str(recorded)
    h = hashlib.sha256()
    parts = sorted(p for p in Path(folder).iterdir() if p.is_dir() and _TEXT_PARTS.match(p.name))
    if not parts:
        raise DataError(
            f"{folder}: no text_encoder*/ or tokenizer*/ folders (no text conditions to identify)"
        )
    for part in parts:
        for f in sorted(p for p in part.rglob("*") if p.is_file()):
            h.update(f.relative_to(folder).as_posix().encode())
            target = f.resolve()
            if f.is_symlink() and _SHA256.match(target.name):  # a hub cache blob: named by its sha256
                h.update(target.name.encode())
                continue
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


class ConditionTable:
    """The conditions of one set of text encoders in a store: write the missing ones, read them by text."""

    def __init__(self, store: Store, encoder_id: str, dtype: str = "float32") -> None:
        if dtype not in _DTYPES:
            raise DataError(f"conditions dtype {dtype!r}: choose float32 or float16")
        self.store, self.encoder_id, self.dtype = store, encoder_id, dtype
        self.name = f"conditions-{encoder_id}"

    # ---- writing --------------------------------------------------------------------------------------
    def _schema(self, sample: Condition) -> pa.Schema:
        _, arrow = _DTYPES[self.dtype]
        fields = [key_field(KEY), pa.field("text", pa.string())]
        for name, t in sample.tensors().items():
            kind = arrow if t.is_floating_point() else pa.int32()
            field = tensor_field(name, tuple(t.shape[1:]) or (1,), kind, nullable=False)
            if t.ndim == 1:  # one value per row (FLUX's guidance): read back as (B,)
                field = field.with_metadata({**field.metadata, SCALAR: b"1"})
            fields.append(field)
        return pa.schema(fields)

    def _have(self) -> set[str]:
        try:
            table = open_table(self.store, self.name)
        except DataError:
            return set()
        table.checkout_latest()
        got = table.to_lance().to_table(columns=[KEY]).column(KEY)
        return set(got.to_pylist())

    def write(
        self,
        model: Model,
        texts: Sequence[str],
        batch_size: int = 64,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> TableRef:
        """Encode the texts the table does not hold yet, `batch_size` at a time, each batch merged on the key
        (exactly once with any number of writers, a rerun skips what is there); -> the table's reference."""
        np_dtype, _ = _DTYPES[self.dtype]
        wanted = list(dict.fromkeys(texts))
        have = self._have()
        todo = [t for t in wanted if prompt_id(t) not in have]
        table = None
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            cond = model.encode(chunk)  # len(chunk) rows, on the encoders' device
            cols: dict[str, Any] = {KEY: pa.array([prompt_id(t) for t in chunk]), "text": pa.array(chunk)}
            for name, t in cond.tensors().items():
                arr = t.detach().float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()
                if t.is_floating_point():
                    if np_dtype == np.float16 and np.abs(arr).max(initial=0.0) > FP16_MAX:
                        raise DataError(
                            f"{name} conditions overflow float16 (max {np.abs(arr).max():.3g}): set "
                            "generation.conditions_dtype=float32"
                        )
                    arr = arr.astype(np_dtype)
                else:
                    arr = arr.astype(np.int32)
                cols[name] = to_tensor_column(arr.reshape(len(chunk), -1) if arr.ndim == 1 else arr)
            if table is None:
                schema = self._schema(cond)
                table = create_table(self.store, self.name, schema, metadata={"encoder": self.encoder_id})
                _check_schema(table.schema, schema, self.name)
            rows = pa.Table.from_arrays(
                [cols[f.name].cast(f.type) for f in table.schema], schema=table.schema
            )
            merge_rows(table, rows, KEY)
            if on_batch is not None:
                on_batch(len(wanted) - len(todo) + start + len(chunk), len(wanted))
        if table is None:
            try:
                open_table(self.store, self.name)
            except DataError as err:
                raise DataError(f"no texts to encode into {self.name}") from err
        log.info("%s: %d texts, %d encoded now", self.name, len(wanted), len(todo))
        return table_ref(self.store, self.name)

    def bytes_per_prompt(self, ref: TableRef) -> int:
        """The tensor bytes one stored condition takes (all fields, the stored dtype)."""
        schema = open_ref(self.store, ref).schema
        total = 0
        for f in schema:
            if pa.types.is_fixed_size_list(f.type):
                total += f.type.list_size * f.type.value_type.bit_width // 8
        return total


def _check_schema(have: pa.Schema, want: pa.Schema, name: str) -> None:
    if [(f.name, f.type) for f in have] != [(f.name, f.type) for f in want]:
        raise DataError(
            f"table {name!r} holds conditions of another layout (dtype or shapes differ): set "
            "generation.conditions_dtype to the table's or use another store"
        )


def conditions_of(store: Store, data: TableRef) -> TableRef | None:
    """The conditions table a pairs table's metadata names (None: made before conditions were stored)."""
    raw = get_metadata(open_ref(store, data)).get(META_KEY)
    return TableRef(**json.loads(raw)) if raw else None


class StoredConditions:
    """Prompts -> their Condition read from a conditions table, with an LRU cache per prompt: what training
    uses instead of the text encoders (same call as `training.student.ConditionCache`)."""

    def __init__(self, store: Store, ref: TableRef, max_entries: int = 4096) -> None:
        self.store, self.ref, self.max_entries = store, ref, max_entries
        self._cache: OrderedDict[str, Condition] = OrderedDict()
        self.hits = self.misses = 0
        schema = open_ref(store, ref).schema
        self.fields = [f for f in schema if pa.types.is_fixed_size_list(f.type)]
        self.shapes = {f.name: tensor_shape(f) for f in self.fields}
        self.scalars = {f.name for f in self.fields if (f.metadata or {}).get(SCALAR)}

    def _fetch(self, texts: list[str]) -> None:
        keys = {prompt_id(t): t for t in texts}
        quoted = ",".join("'" + k + "'" for k in keys)
        table = open_ref(self.store, self.ref)
        with self.store.guard(f"read conditions from {self.ref.key()}"):
            rows = table.to_lance().to_table(
                columns=[KEY, *(f.name for f in self.fields)], filter=f"{KEY} IN ({quoted})"
            )
        found = rows.column(KEY).to_pylist()
        missing = [keys[k] for k in keys if k not in found]
        if missing:
            raise DataError(
                f"{self.ref.key()} holds no condition for {len(missing)} prompt(s) (e.g. {missing[0]!r}): "
                "rerun the stage that made the pairs (it encodes every planned prompt)"
            )
        for i, key in enumerate(found):
            tensors = {}
            for f in self.fields:
                arr = from_tensor_column(rows.column(f.name).slice(i, 1), self.shapes[f.name])
                t = torch.from_numpy(np.ascontiguousarray(arr))
                t = t.float() if t.is_floating_point() else t.long()
                tensors[f.name] = t.reshape(1) if f.name in self.scalars else t
            self._cache[keys[key]] = Condition.from_tensors(tensors)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], device: torch.device | None = None) -> Condition:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            self._fetch(missing)
        out = []
        for p in prompts:
            self._cache.move_to_end(p)
            out.append(self._cache[p])
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        cond = Condition.cat(out)
        return cond.to(device) if device is not None else cond
