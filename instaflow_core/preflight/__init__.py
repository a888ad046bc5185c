"""Preflight: everything a run will need, checked in seconds before any stage starts, nothing written.

`checks` holds the pure checks (one small function each, returning the problems it found as one-line strings);
`tasks/preflight.py` adds the ones that need the tracking server and runs the set a command needs.
"""

from instaflow_core.preflight.checks import PreflightError

__all__ = ["PreflightError"]
