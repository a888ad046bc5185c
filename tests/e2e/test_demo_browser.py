"""`instaflow demo` in headless Chromium: the page loads, a prompt is submitted, the champion's image appears.

The demo runs as a user starts it (the console script, its own process) on the session's registered champion
(tests/plugins/registered_models.py) and the tiny teacher. Chromium types a prompt into the Generate tab, clicks
Generate and waits for the gallery's image to load; the page shows the time per image and the lineage read from
the registry (version, prompt set, triplet table version, metrics). Then the Compare tab runs the champion at one
step beside the teacher at its steps on the same noise. Screenshots are kept under test-output/demo/. The demo
process runs with network auditing: it must not try to reach any host but loopback (gradio's telemetry is off).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.procs import LOOPBACK, free_port, http_ok, log_tail, stop_pid, wait_until
from tests.support.browser import TEST_OUTPUT, Browser, find_chromium

OUT = TEST_OUTPUT / "demo"
PROMPT = "a red car at sunset"

# Run inside the demo process: log every connection attempt to a host that is not loopback.
AUDIT = """
import sys
def _hook(event, args):
    if event in ("socket.getaddrinfo", "socket.connect"):
        host = args[0] if event == "socket.getaddrinfo" else (args[1][0] if isinstance(args[1], tuple) else args[1])
        host = host.decode() if isinstance(host, bytes) else str(host)
        if host and host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0") and not host.startswith("/"):
            print(f"NET-AUDIT {event} {host}", file=sys.stderr, flush=True)
sys.addaudithook(_hook)
from flows.cli.main import main
sys.argv = ["instaflow", *sys.argv[1:]]
main()
"""


def _type(page: Browser, selector: str, text: str) -> None:
    """Focus the element and insert text as a user would (Svelte listens for real input events)."""
    assert page.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false;"
                     " e.focus(); e.select && e.select(); return true; })()"), selector  # fmt: skip
    page.send("Input.insertText", text=text)


def _click(page: Browser, selector: str) -> None:
    assert page.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false;"
                     " e.scrollIntoView(); e.click(); return true; })()"), selector  # fmt: skip


def _loaded_images(page: Browser, selector: str) -> int:
    """How many <img> under `selector` finished loading with real pixels."""
    js = f"[...document.querySelectorAll({json.dumps(selector + ' img')})].filter(i => i.complete && i.naturalWidth > 0).length"
    return int(page.eval(js) or 0)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium)"
)
def test_demo_page_makes_an_image_from_the_champion(registered_tiny: Any, tmp_path: Path) -> None:
    reg = registered_tiny
    port = free_port()
    url = f"http://{LOOPBACK}:{port}/"
    log = tmp_path / "demo.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", AUDIT, "demo", "--model", f"{reg.name}@champion", "--model", "teacher",
           "--port", str(port), *reg.cli]  # fmt: skip
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        assert wait_until(lambda: http_ok(url), 300, interval=1.0, alive=lambda: proc.poll() is None), (
            log_tail(log, 40)
        )
        assert f"demo on {url}" in log.read_text()
        with Browser(find_chromium(), tmp_path / "chromium") as page:
            page.goto(url)
            assert wait_until(
                lambda: page.eval("!!document.querySelector('#generate-btn')"), 60, interval=0.3
            )
            _type(page, "#prompt textarea", PROMPT)
            _click(page, "#generate-btn")
            if not wait_until(lambda: _loaded_images(page, "#gallery") >= 1, 120, interval=0.3):
                page.screenshot(OUT / "generate-failed.png")
                raise AssertionError(f"no image in the gallery: {page.text()[-1500:]}\n{log_tail(log, 30)}")
            text = page.text()
            assert "ms per image" in text and "1 step(s)" in text
            # the lineage panel: registry version, prompt set, triplet table version, metrics
            for needle in (f"models:/{reg.name}/{reg.version}", "prompts@v3", "triplets@v7", "fid", "41.5"):
                assert needle in text, (needle, text[-2000:])
            page.screenshot(OUT / "generate.png")

            assert page.eval(  # the tab, not the Compare button inside it (not rendered until the tab opens)
                "(() => { const t = [...document.querySelectorAll('[role=tab]')]"
                ".find(e => e.innerText.trim() === 'Compare'); if (!t) return false; t.click(); return true; })()"
            )
            assert wait_until(lambda: page.eval("!!document.querySelector('#compare-btn')"), 30, interval=0.3)
            _type(page, "#c-prompt textarea", PROMPT)
            _click(page, "#compare-btn")
            both = lambda: _loaded_images(page, "#cmp-0") >= 1 and _loaded_images(page, "#cmp-1") >= 1  # noqa: E731
            if not wait_until(both, 120, interval=0.3):
                page.screenshot(OUT / "compare-failed.png")
                raise AssertionError(f"compare images did not appear: {page.text()[-1500:]}")
            assert "time per image" in page.text()
            page.screenshot(OUT / "compare.png")
    finally:
        stop_pid(proc.pid, timeout=15)
    audit = [ln for ln in log.read_text(errors="replace").splitlines() if "NET-AUDIT" in ln]
    assert audit == [], audit
    assert (OUT / "generate.png").stat().st_size > 0 and (OUT / "compare.png").stat().st_size > 0
