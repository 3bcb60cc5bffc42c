"""Helpers for the browser tests: Debian's headless chromium driven by Selenium through the system
chromedriver (no browser download), a real `python -m service` subprocess, test photos and screenshots."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
# CI uploads this folder as the run's artifacts; it is gitignored.
ARTIFACTS = ROOT / "test-artifacts"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)


def require_chromium() -> tuple[str, str]:
    """(browser, chromedriver) paths, or skip the test when either (or selenium) is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium")
    return browser, driver


def make_driver(
    browser: str,
    driver_path: str,
    profile_dir: Path,
    width: int = 1280,
    height: int = 900,
    extra_flags: tuple[str, ...] = (),
    prefs: dict[str, Any] | None = None,
) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in (*CHROME_FLAGS, *extra_flags):
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile_dir}")
    opts.add_argument(f"--window-size={width},{height}")
    if prefs:
        opts.add_experimental_option("prefs", prefs)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(
                f"the service exited with {proc.returncode}:\n{log.read().decode(errors='replace')[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    log.seek(0)
    pytest.fail(
        f"the service was not ready after {timeout:.0f} s:\n{log.read().decode(errors='replace')[-3000:]}"
    )


@contextlib.contextmanager
def running_service(
    checkpoint: Path, extra_env: dict[str, str] | None = None, timeout: float = 90, port: int | None = None
) -> Iterator[str]:
    """A real uvicorn (`python -m service`) on a loopback port (a free one unless given: a service restarted
    on the same address); yields its base URL."""
    port = port or free_port()
    # The developer's own CARVAE_* settings (an API key, another checkpoint) must not leak into the test.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CARVAE_")},
        "CARVAE_CHECKPOINT": str(checkpoint),
        "CARVAE_HOST": "127.0.0.1",
        "CARVAE_PORT": str(port),
        "CARVAE_DEVICE": "cpu",
        "CARVAE_TORCH_THREADS": "1",
        "CARVAE_LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            _wait_ready(f"http://127.0.0.1:{port}", proc, log, timeout)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def car_photo(path: Path, body: tuple[int, int, int], sky: tuple[int, int, int] = (170, 200, 230)) -> Path:
    """A 160×96 side-view 'photo' of a car: enough structure for a reconstruction to be meaningful."""
    img = Image.new("RGB", (160, 96), sky)
    d = ImageDraw.Draw(img)
    d.rectangle((0, 70, 160, 96), fill=(90, 90, 95))  # road
    d.polygon([(12, 66), (20, 48), (50, 44), (66, 28), (112, 28), (128, 44), (150, 48), (150, 66)], fill=body)
    d.polygon([(72, 32), (108, 32), (118, 44), (62, 44)], fill=(200, 225, 240))  # windows
    for cx in (42, 122):
        d.ellipse((cx - 12, 56, cx + 12, 80), fill=(25, 25, 25))
        d.ellipse((cx - 5, 63, cx + 5, 73), fill=(170, 170, 170))
    img.save(path, "PNG")
    return path


def data_url_pixels(src: str) -> Image.Image:
    """An RGB image from a data: URL the page put in an <img>."""
    header, _, payload = src.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64"), header[:40]
    return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")


def same_picture(src_a: str, src_b: str) -> bool:
    """Whether two data: URLs show the same picture. The same latent code decoded in batches of other
    sizes, or on another number of torch threads, can come out one level apart in a pixel or two (the
    convolutions sum in another order), so its PNG bytes are not always equal; another code differs by far
    more than that."""
    if not (src_a.startswith("data:image/") and src_b.startswith("data:image/")):
        return False
    if src_a == src_b:
        return True
    a = np.asarray(data_url_pixels(src_a), dtype=np.int16)
    b = np.asarray(data_url_pixels(src_b), dtype=np.int16)
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 2


def screenshot(driver: Any, name: str) -> Path:
    """Full-page PNG into test-artifacts/ (CDP captures beyond the viewport, so nothing is cut off)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    # innerWidth, not clientWidth: capturing beyond the viewport lays the page out without a scrollbar.
    width, height = driver.execute_script("return [window.innerWidth, document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
