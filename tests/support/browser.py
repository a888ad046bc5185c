"""Test helpers for the Prefect UI checks: a throwaway `prefect server start` and headless Chromium over CDP.

Chromium is driven through the Chrome DevTools Protocol (a websocket; `websockets` comes with Prefect) so a
test can wait for the single-page app to render what it expects, click a tab and take a screenshot, instead
of guessing a fixed render budget.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra.procs import LOOPBACK, free_port, http_ok, log_tail, stop_pid, wait_until
from tests.support import REPO

TEST_OUTPUT = REPO / "test-output"  # gitignored; screenshots are kept here as test outputs


def fast_tiny_overrides() -> list[str]:
    """`--set` overrides that make the tiny rebuild as short as it can be while every stage still runs."""
    return [
        "curation.max_prompts=40",
        "generation.max_prompts=16",
        "generation.images_per_prompt=1",
        "generation.num_inference_steps=2",
        "reflow.stages.0.steps=4",
        "reflow.checkpoint_every=2",
        "reflow.warmup_steps=0",
        "reflow.sample_steps=2",
        "distillation.stages.0.steps=4",
        "distillation.checkpoint_every=2",
        "distillation.warmup_steps=0",
        "distillation.sample_steps=2",
        "distillation.pairs.num_inference_steps=2",
        "distillation.pairs.max_prompts=16",
        "evaluation.num_samples=4",
        "evaluation.teacher_steps=2",
        "evaluation.rf_steps=[1,2]",
        "evaluation.straightness_steps=2",
        "evaluation.latency_repeats=1",
    ]


# --------------------------------------------------------------------------------------- Prefect server
def prefect_server_env(home: Path, port: int) -> dict[str, str]:
    """Environment for a Prefect server on loopback:port with its own home and SQLite database.

    The UI asks the API at PREFECT_UI_API_URL, which otherwise defaults to the *default* port (4200), not the
    one given to `prefect server start --port`: set it (and the server's host/port settings) explicitly.
    """
    env = os.environ.copy()
    for k in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
        env.pop(k, None)
    url = f"http://{LOOPBACK}:{port}"
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="true",
        PREFECT_SERVER_API_HOST=LOOPBACK,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=f"{url}/api",
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
    )
    return env


@contextlib.contextmanager
def prefect_server(home: Path, timeout: float = 180.0) -> Iterator[str]:
    """Start `prefect server start` on a free loopback port; yields its API URL (.../api); stops it after."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = home / "server.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", LOOPBACK, "--port", str(port)],
            env=prefect_server_env(home, port),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group: stopping it stops its workers and nothing else
        )
    api = f"http://{LOOPBACK}:{port}/api"
    try:
        if not wait_until(lambda: http_ok(f"{api}/health"), timeout, alive=lambda: proc.poll() is None):
            raise RuntimeError(f"prefect server did not start on {api}:\n{log_tail(log, 30)}")
        yield api
    finally:
        stop_pid(proc.pid, timeout=15)


# -------------------------------------------------------------------------------------------- Chromium
def find_chromium() -> str | None:
    """The Chromium binary ($INSTAFLOW_CHROMIUM, or Debian's `chromium` on PATH), or None."""
    explicit = os.environ.get("INSTAFLOW_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, binary: str, profile_dir: Path, width: int = 1400, height: int = 900) -> None:
        from websockets.sync.client import connect

        profile_dir.mkdir(parents=True, exist_ok=True)
        # A reused profile keeps the last run's DevToolsActivePort: reading that stale port before Chromium
        # rewrites the file would connect to nothing (connection refused). Chromium writes a fresh one.
        active = profile_dir / "DevToolsActivePort"
        active.unlink(missing_ok=True)
        self.log = profile_dir / "chromium.log"
        cmd = [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile_dir}",
            f"--remote-debugging-address={LOOPBACK}",
            "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
            f"--window-size={width},{height}",
            "about:blank",
        ]
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        try:
            if not wait_until(lambda: active.exists() and active.read_text().strip(), 30, alive=self._alive):
                raise RuntimeError(f"chromium did not open its DevTools port:\n{log_tail(self.log)}")
            port = int(active.read_text().split()[0])
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/json/list", timeout=10) as resp:  # noqa: S310
                pages = [t for t in json.load(resp) if t.get("type") == "page"]
            if not pages:
                raise RuntimeError("chromium has no page target")
            self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        except BaseException:
            stop_pid(self.proc.pid, timeout=5)
            raise
        self._ids = itertools.count(1)
        self.send("Page.enable")
        self.send("Runtime.enable")

    def _alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        """One CDP command; events that arrive meanwhile are dropped."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"CDP {method}: no answer in {timeout:.0f}s")
            msg = json.loads(self.ws.recv(timeout=left))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error: {res['exceptionDetails'].get('text')}")
        return res.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def text(self) -> str:
        """The page's visible text (what a user reads)."""
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needle: str, timeout: float = 30.0) -> bool:
        """Poll until `needle` is in the rendered text (the SPA fetches and renders asynchronously)."""
        return wait_until(lambda: needle in self.text(), timeout, interval=0.5)

    def click_text(self, label: str) -> bool:
        """Click the first button, tab or link whose own text is exactly `label`; False if none."""
        js = f"""
        (() => {{
          const want = {json.dumps(label)};
          const els = [...document.querySelectorAll('button, a, [role=tab], li, span, div')];
          const el = els.find(e => e.children.length <= 1 && e.innerText && e.innerText.trim() === want);
          if (!el) return false;
          el.scrollIntoView();
          el.click();
          return true;
        }})()
        """
        return bool(self.eval(js))

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        stop_pid(self.proc.pid, timeout=10)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
