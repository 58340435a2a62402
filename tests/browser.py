"""Open an HTML file in real headless Chromium with every network request refused."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
          "--enable-logging=stderr", "--v=0", "--virtual-time-budget=30000"]


@dataclass
class Rendered:
    dom: str  # the DOM after scripts ran
    console: list[str]  # console messages Chromium logged
    screenshot: Path

    @property
    def console_errors(self) -> list[str]:
        return [line for line in self.console if ":ERROR:CONSOLE" in line or "Uncaught" in line]

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.dom))


def render(page: Path, screenshot: Path, *, width: int = 1280, height: int = 6000) -> Rendered:
    """Load ``page`` offline; return the DOM, console lines and a full-width screenshot."""
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        base = [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180)
        subprocess.run([*base, f"--window-size={width},{height}", f"--screenshot={screenshot}", url],
                       capture_output=True, text=True, timeout=180)
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    return Rendered(dom.stdout, console, screenshot)
