"""Helpers the test modules share (not tests themselves): the repository root, the browser driver, workers."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: tests/support/__init__.py -> <repo>
