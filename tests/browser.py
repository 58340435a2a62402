"""Open an HTML file in real headless Chromium with every network request refused.

Chromium's ``--enable-logging=stderr`` prints every console message as a ``CONSOLE`` line, but at
level INFO whatever the JavaScript level (``console.error("boom")`` shows as ``INFO:CONSOLE``),
and it prints nothing for a resource that fails to load. So the page is opened through a copy
that starts with a small watcher: a capture-phase ``error`` listener that logs every failed
``<script>``/``<img>``/``<link>`` load to the console. Our pages log nothing, so every console
line counts as an error.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=30000",
]
# Resource errors do not bubble; a listener on window in the capture phase sees them all.
_WATCHER = (
    '<script>window.addEventListener("error", function (e) {'
    ' var t = e.target; if (t && t !== window) console.error("Failed to load resource: "'
    " + (t.src || t.href || t.data || t.tagName)); }, true);</script>"
)
_HEAD = re.compile(r"<head(\s[^>]*)?>", re.IGNORECASE)


@dataclass
class Rendered:
    dom: str  # the DOM after scripts ran
    console: list[str]  # every console message Chromium logged, failed loads included
    screenshot: Path

    @property
    def console_errors(self) -> list[str]:
        """Every console message: a clean page logs nothing (any level, any source)."""
        return list(self.console)

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.dom))


def _watched_copy(page: Path, folder: Path) -> Path:
    """``page`` with the watcher first in <head> and a <base> so relative URLs still resolve."""
    source = page.read_text(encoding="utf-8")
    base = f'<base href="{html.escape(page.parent.as_uri())}/">'
    found = _HEAD.search(source)
    at = found.end() if found else 0
    copy = folder / page.name
    copy.write_text(source[:at] + base + _WATCHER + source[at:], encoding="utf-8")
    return copy


def render(page: Path, screenshot: Path, *, width: int = 1280, height: int = 6000) -> Rendered:
    """Load ``page`` offline; return the DOM, console lines and a full-width screenshot."""
    with tempfile.TemporaryDirectory() as tmp:
        profile, copies = Path(tmp) / "profile", Path(tmp) / "page"
        copies.mkdir()
        url = _watched_copy(page.resolve(), copies).as_uri()
        base = [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180)
        subprocess.run(
            [*base, f"--window-size={width},{height}", f"--screenshot={screenshot}", url],
            capture_output=True,
            text=True,
            timeout=180,
        )
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    return Rendered(dom.stdout, console, screenshot)
