"""Headless Chromium for the browser tests: Debian's `chromium` driven by Playwright for Python (`make browser`
installs both). Playwright's own browser download is not used: it is given the system's executable."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Optional

import pytest

# Chromium on a machine without a display, a GPU or outside network: no sandbox (tests run as root), and none
# of its background connections (updates, sync, QUIC), which fail here by the dozen and slow its start.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> Optional[str]:
    """LORAKIT_CHROMIUM, else `chromium` on the PATH (Debian's package), else None."""
    named = os.environ.get("LORAKIT_CHROMIUM")
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright):
    """A headless Chromium (Playwright gives each launch a new, empty profile directory)."""
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed: `make browser` installs it (apt-get install chromium) and Playwright")
    return playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_FLAGS)


@pytest.fixture(scope="module")
def browser():
    if chromium_path() is None:
        pytest.skip("Chromium is not installed: `make browser` installs it (apt-get install chromium) and Playwright")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed: `make browser` installs it (pip install playwright)")
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


def artifact_dir(tmp_path_factory) -> Path:
    """Where screenshots go: LORAKIT_TEST_ARTIFACTS (kept by CI), else a pytest temporary directory."""
    named = os.environ.get("LORAKIT_TEST_ARTIFACTS")
    if named:
        path = Path(named)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("screenshots")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])
