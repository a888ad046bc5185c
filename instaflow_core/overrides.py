"""`section.key=value` overrides on a raw config mapping, and validation errors as one line.

Pure helpers of `instaflow_core.config.load` (kept apart so the config module holds only the sections).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from instaflow_core.errors import ConfigError


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = [k for k in key.strip().split(".") if k]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set `value` at `parts` in the raw config mapping (list indices for `stages.0.steps`), making sections."""
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            if isinstance(nxt, list) and parts[i + 1].isdigit():
                # stages.0.steps=5: index into a list of sections
                idx = int(parts[i + 1])
                if idx >= len(nxt):
                    raise ConfigError(f"override {'.'.join(parts)}: index {idx} out of range")
                if i + 2 == len(parts):
                    nxt[idx] = value
                    return
                apply_override(nxt[idx], parts[i + 2 :], value)
                return
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def format_validation(err: ValidationError) -> str:
    """A pydantic error as one line: `section.key: message; ...` (unknown keys say so)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(lines)
