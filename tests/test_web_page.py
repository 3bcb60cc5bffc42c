"""End-to-end tests of the web page in headless chromium against a real `python -m service`.

Each test saves a full-page screenshot into test-artifacts/. Set CARVAE_WEB_TEST_URL to run them against a
service that is already running (e.g. the Docker one) instead of starting one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from browser import (
    car_photo,
    data_url_pixels,
    free_port,
    make_driver,
    require_chromium,
    running_service,
    same_picture,
    screenshot,
)

from carvae.checkpoint import save_checkpoint
from carvae.model import VAE, VAEConfig
from carvae.preprocess import PreprocessPolicy

pytestmark = pytest.mark.browser

WAIT_S = 30
API_KEY = "web-test-key-7Qx"


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    return require_chromium()


@pytest.fixture(scope="module")
def base_url(chromium: tuple[str, str], tiny_checkpoint: Path) -> Iterator[str]:
    external = os.environ.get("CARVAE_WEB_TEST_URL")
    if external:
        yield external.rstrip("/")
        return
    with running_service(tiny_checkpoint) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_base_url(chromium: tuple[str, str], tiny_checkpoint: Path) -> Iterator[str]:
    """A second service that requires CARVAE_API_KEY."""
    if os.environ.get("CARVAE_WEB_TEST_URL"):
        pytest.skip("needs its own service started with an API key")
    with running_service(tiny_checkpoint, {"CARVAE_API_KEY": API_KEY}) as url:
        yield url


@pytest.fixture(scope="module")
def browser(chromium: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    driver = make_driver(*chromium, profile_dir=tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any, base_url: str) -> Iterator[Any]:
    """The page, loaded fresh, with the model card in and the first sample grid drawn. Afterwards: no
    uncaught script error happened (HTTP errors the page reports are logged as 'network', not here)."""
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get_log("browser")  # drop what earlier tests left
    browser.get(f"{base_url}/")
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    wait_for(browser, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)
    yield browser
    logged = browser.get_log("browser")
    script_errors = [e["message"] for e in logged if e.get("source") == "javascript"]
    assert not script_errors
    # The service's Content-Security-Policy (service.headers) blocked nothing the page does.
    assert not [e["message"] for e in logged if "Content Security Policy" in e["message"]]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    text = folder / "notes.txt"
    text.write_text("this is not a picture of a car\n")
    return {
        "red": car_photo(folder / "red-car.png", (200, 30, 40)),
        "blue": car_photo(folder / "blue-car.png", (30, 60, 190), sky=(235, 225, 200)),
        "text": text,
    }


def wait_for(driver: Any, condition: Any, timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def by_id(driver: Any, element_id: str) -> Any:
    return driver.find_element("id", element_id)


def src_of(driver: Any, element_id: str) -> str:
    return str(by_id(driver, element_id).get_attribute("src") or "")


def model_info(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/v1/model", timeout=10) as r:
        return dict(json.load(r))


def decode_via_api(base_url: str, rows: list[list[float]]) -> list[np.ndarray]:
    images: list[np.ndarray] = []
    for start in range(0, len(rows), 64):  # /decode takes at most 64 rows, as the page knows too
        req = urllib.request.Request(
            f"{base_url}/decode",
            data=json.dumps({"z": rows[start : start + 64]}).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.load(r)
        prefix = f"data:image/{body['format']};base64,"
        images += [np.asarray(data_url_pixels(prefix + b64), dtype=np.float64) for b64 in body["images"]]
    return images


def open_without_a_key(browser: Any, url: str) -> Any:
    """The page of a service that needs an API key, in a tab with none saved: its message asking for one."""
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get(f"{url}/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    msg = by_id(browser, "global-msg")
    wait_for(browser, lambda d: "needs an API key" in msg.text)
    return msg


def upload(driver: Any, input_id: str, path: Path) -> None:
    by_id(driver, input_id).send_keys(str(path))


def answer_in_browser(page: Any, path_end: str, status: int, body: str, headers: dict[str, str]) -> None:
    """Make the page's fetch of URLs ending in `path_end` get this answer (what a proxy or rate limiter in
    front of the service would send, which a test cannot get from the service itself)."""
    page.execute_script(
        """
        const [end, status, body, headers] = arguments;
        const real = window.fetch;
        const statusText = {429: 'Too Many Requests', 502: 'Bad Gateway'}[status] || '';
        window.fetch = (url, opts) => String(url).endsWith(end)
          ? Promise.resolve(new Response(body, {status, statusText, headers}))
          : real(url, opts);
        """,
        path_end,
        status,
        body,
        headers,
    )


def delay_in_browser(page: Any, path_end: str, delays_ms: list[int]) -> None:
    """Hold the page's next fetches of URLs ending in `path_end` for these many milliseconds each (a slow
    service or link), and record each such call in window.heldCalls: [{aborted}], whether the page
    cancelled it. A second call replaces the first's rule."""
    page.execute_script(
        """
        const [end, delays] = arguments;
        window.heldCalls = [];
        window.heldRule = {end, delays};
        if (window.heldFetch) return;
        const real = window.fetch;
        window.heldFetch = (url, opts = {}) => {
          const rule = window.heldRule;
          if (!String(url).endsWith(rule.end)) return real(url, opts);
          const call = {aborted: false};
          window.heldCalls.push(call);
          if (opts.signal) opts.signal.addEventListener('abort', () => { call.aborted = true; });
          const ms = rule.delays.shift() || 0;
          return new Promise((r) => setTimeout(r, ms)).then(() => real(url, opts));
        };
        window.fetch = window.heldFetch;
        """,
        path_end,
        delays_ms,
    )


def test_upload_shows_model_input_reconstruction_and_psnr(
    page: Any, base_url: str, photos: dict[str, Path]
) -> None:
    size = model_info(base_url)["image_size"]
    upload(page, "file-input", photos["red"])
    wait_for(page, lambda d: src_of(d, "recon-img").startswith("data:image/"))
    wait_for(page, lambda d: re.fullmatch(r"\d+\.\d\d dB", by_id(d, "psnr").text))

    original = data_url_pixels(src_of(page, "original-img"))
    recon = data_url_pixels(src_of(page, "recon-img"))
    assert original.size == recon.size == (size, size)  # the model's view, not the uploaded photo
    # The shown PSNR is the one between the two shown images.
    mse = np.mean((np.asarray(original, float) - np.asarray(recon, float)) ** 2)
    shown = float(by_id(page, "psnr").text.split()[0])
    assert shown == pytest.approx(10 * np.log10(255.0**2 / mse), abs=0.6)
    download = by_id(page, "download")
    assert download.get_attribute("href") == src_of(page, "recon-img")
    assert download.get_attribute("download").endswith(".png")
    assert "red-car.png" in by_id(page, "recon-img").get_attribute("alt")
    assert "red-car.png" in by_id(page, "reconstruct-msg").text
    # The upload also loads the photo's latent into the explorer, whose first decode is the reconstruction.
    wait_for(page, lambda d: "red-car.png" in by_id(d, "latent-source").text)
    wait_for(page, lambda d: same_picture(src_of(d, "latent-img"), src_of(d, "recon-img")))
    screenshot(page, "web-reconstruct")


def test_sliders_are_ranked_and_redecode_the_image(page: Any, base_url: str, photos: dict[str, Path]) -> None:
    latent_dim = model_info(base_url)["latent_dim"]
    sliders = page.find_elements("css selector", "#sliders input[type=range]")
    assert len(sliders) == min(12, latent_dim)
    # The order is by how much a step of 2 along each dimension changes the decoded image around z = 0.
    rows = [[0.0] * latent_dim] + [
        [2.0 if j == d else 0.0 for j in range(latent_dim)] for d in range(latent_dim)
    ]
    images = decode_via_api(base_url, rows)
    effect = [float(np.mean(np.abs(img - images[0]))) for img in images[1:]]
    shown = [int(s.get_attribute("data-dim")) for s in sliders]
    assert [effect[d] for d in shown] == sorted((effect[d] for d in shown), reverse=True)
    assert min(effect[d] for d in shown) >= sorted(effect, reverse=True)[len(shown) - 1]

    upload(page, "file-input", photos["blue"])
    wait_for(page, lambda d: "blue-car.png" in by_id(d, "latent-source").text)
    wait_for(page, lambda d: same_picture(src_of(d, "latent-img"), src_of(d, "recon-img")))
    before = src_of(page, "latent-img")
    from selenium.webdriver.common.keys import Keys

    sliders[0].send_keys(Keys.END)  # keyboard: the most effective dimension to its maximum
    assert sliders[0].get_attribute("value") == "3"
    wait_for(page, lambda d: not same_picture(src_of(d, "latent-img"), before))
    after = np.asarray(data_url_pixels(src_of(page, "latent-img")), float)
    assert np.mean(np.abs(after - np.asarray(data_url_pixels(before), float))) > 0
    screenshot(page, "web-slider")

    by_id(page, "latent-reset").click()
    wait_for(page, lambda d: same_picture(src_of(d, "latent-img"), before))


def test_same_seed_gives_the_same_grid_and_a_click_loads_the_exact_latent(page: Any) -> None:
    def grid_for(seed: int) -> list[str]:
        field = by_id(page, "seed")
        field.clear()
        field.send_keys(str(seed))
        by_id(page, "sample-btn").click()
        wait_for(page, lambda d: f"seed {seed}," in by_id(d, "sample-msg").text)
        return [img.get_attribute("src") for img in page.find_elements("css selector", "#sample-grid img")]

    first = grid_for(1234)
    other = grid_for(99)
    again = grid_for(1234)
    assert len(first) == 16 and len(set(first)) > 1
    assert all(map(same_picture, again, first))
    assert not all(map(same_picture, other, first))

    buttons = page.find_elements("css selector", "#sample-grid button")
    buttons[5].click()
    assert buttons[5].get_attribute("aria-pressed") == "true"
    wait_for(page, lambda d: "Sample 6 (seed 1234" in by_id(d, "latent-source").text)
    # The explorer decodes the very latent the sample came from, so it shows the same image.
    wait_for(page, lambda d: same_picture(src_of(d, "latent-img"), first[5]))
    screenshot(page, "web-sample")


def test_bad_upload_shows_the_api_error(page: Any, photos: dict[str, Path]) -> None:
    upload(page, "file-input", photos["text"])
    msg = by_id(page, "reconstruct-msg")
    wait_for(page, lambda d: "unsupported_media_type" in msg.text)
    assert "notes.txt" in msg.text and "not an image" in msg.text
    assert "error" in msg.get_attribute("class")
    assert msg.get_attribute("aria-live") == "polite"
    assert not by_id(page, "compare").is_displayed()
    screenshot(page, "web-error")


def test_overload_is_reported_with_the_retry_delay(page: Any) -> None:
    # Overload cannot be produced on demand from a tiny model, so the browser answers /decode with the
    # service's 503 contract; what is under test is that the page turns it into a readable message.
    body = json.dumps(
        {"error": {"code": "overloaded", "message": "too many requests queued", "request_id": "r1"}}
    )
    answer_in_browser(page, "decode", 503, body, {"Content-Type": "application/json", "Retry-After": "2"})
    by_id(page, "sample-btn").click()
    msg = by_id(page, "sample-msg")
    wait_for(page, lambda d: "busy" in msg.text)
    assert "try again in 2 s" in msg.text and "overloaded" in msg.text
    screenshot(page, "web-overloaded")


def test_keyboard_reaches_the_upload_first(page: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    # The page was just loaded, so sequential focus navigation starts at the top of the document.
    reached = []
    for _ in range(8):
        ActionChains(page).send_keys(Keys.TAB).perform()
        reached.append(
            page.execute_script("return document.activeElement.id || document.activeElement.localName")
        )
        if reached[-1] == "file-input":
            break
    assert reached[-1] == "file-input", reached
    # The visible drop zone shows that its (visually hidden) input has focus.
    outline = page.execute_script("return getComputedStyle(document.getElementById('dropzone')).outlineStyle")
    assert outline == "solid"
    # Every image the page shows has a text alternative.
    shown_without_alt = "return [...document.images].filter(i => i.getClientRects().length && !i.alt).length"
    assert page.execute_script(shown_without_alt) == 0
    screenshot(page, "web-keyboard")


def test_interpolation_player(page: Any, photos: dict[str, Path]) -> None:
    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    steps = by_id(page, "steps")
    steps.clear()
    steps.send_keys("6")
    by_id(page, "interp-btn").click()
    wait_for(page, lambda d: len(d.find_elements("css selector", "#strip img")) == 6)
    frames = [img.get_attribute("src") for img in page.find_elements("css selector", "#strip img")]
    assert frames[0] != frames[-1]

    play = by_id(page, "play")
    if play.get_attribute("data-playing") == "true":
        play.click()  # the player starts by itself unless reduced motion is asked for
    assert play.text == "Play"
    from selenium.webdriver.common.keys import Keys

    by_id(page, "frame").send_keys(Keys.END)
    assert by_id(page, "frame-out").text == "6 of 6"
    assert src_of(page, "frame-img") == frames[-1]
    play.click()
    assert play.text == "Pause"
    wait_for(page, lambda d: src_of(d, "frame-img") != frames[-1])
    screenshot(page, "web-interpolate")


def test_model_card_and_links(page: Any, base_url: str) -> None:
    info = model_info(base_url)
    card = by_id(page, "model-card").text
    assert f"{info['image_size']} × {info['image_size']} px" in card
    assert f"{info['latent_dim']} dimensions" in card
    assert info["device"] in card and info["model_id"] in card
    hrefs = [a.get_attribute("href") for a in page.find_elements("css selector", "#model .links a")]
    for path in ("/docs", "/metrics"):
        url = next(h for h in hrefs if h.endswith(path))
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200


def test_the_model_card_shows_an_empty_list_as_none(page: Any) -> None:
    # A checkpoint trained without augmentation records augment: [], which the card showed as an empty
    # cell beside "Augment", as if the value were missing.
    shown = page.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        import('./static/js/modelcard.js').then(({ renderModelCard }) => {
          const card = document.createElement('div');
          renderModelCard(card, {model_id: 'm', image_size: 32, latent_dim: 8, training: {augment: []}});
          const dt = [...card.querySelectorAll('dt')].find((t) => t.textContent === 'Augmentation');
          done(dt.nextElementSibling.textContent);
        });
        """
    )
    assert shown == "none"


def test_the_model_card_labels_the_training_record_and_shows_each_fact_once(
    browser: Any, tmp_path: Path
) -> None:
    # The card read "Lr", "Ema", "Kl", "Psnr" (its keys capitalised), gave the PSNR without its unit, and
    # listed the run's settings twice: at the record's top level and again in its signature.
    if os.environ.get("CARVAE_WEB_TEST_URL"):
        pytest.skip("needs a checkpoint with a full training record")
    settings = {"recipe": "sigma-vae", "beta": 1.0, "kl_warmup_epochs": 5, "batch_size": 16, "seed": 0}
    training = {
        "complete": True,
        "signature": {
            **settings,
            **{"data_fingerprint": "abc123", "image_size": 32, "latent_dim": 8, "channels": [8, 16, 16]},
            **{"epochs": 40, "lr": 0.002, "lr_schedule": "cosine", "warmup_steps": 100, "ema": 0.999},
            **{"val_fraction": 0.1, "resize_policy": "stretch", "augment": ["hflip"], "prior": "fitted"},
        },
        "data": {"source": "synthetic", "count": 118, "skipped": 0, "seed": 0, "fingerprint": "abc123"},
        "split": {"seed": 0, "val_fraction": 0.1, "train": 106, "val": 12, "val_hash": "def456"},
        **settings,
        "prior": "fitted",
        "augment": ["hflip"],
        "epochs_requested": 40,
        "epochs_done": 40,
        "best_val": {"psnr": 24.1234, "ssim": 0.7123, "loss": 0.5, "recon": 0.4, "kl": 12.5, "mse": 0.0039},
        "lr_schedule": {
            "kind": "cosine",
            "lr": 0.002,
            "warmup_steps": 100,
            "min_lr": 2e-5,
            "planned_epochs": 40,
        },
        "train_seconds": 812.4,
        "device": "cuda:0",
        "val_lpips": 0.21,  # a key the page has no label for
        "constructor": 1,  # and one that is also a name every JavaScript object has
    }
    checkpoint = tmp_path / "trained.safetensors"
    torch.manual_seed(0)
    save_checkpoint(
        checkpoint,
        VAE(VAEConfig(image_size=32, latent_dim=8, channels=(8, 16, 16))),
        PreprocessPolicy(32),
        training,
    )
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get_log("browser")
    with running_service(checkpoint) as url:
        browser.get(f"{url}/")
        wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        rows: list[list[str]] = browser.execute_script(
            """
            return [...document.querySelectorAll('#model-card .card-part:last-child dt')].map((dt) => {
              const dd = dt.nextElementSibling;
              return [dt.textContent, dd.classList.contains('nested') ? '' : dd.textContent];
            });
            """
        )
        screenshot(browser, "web-model-card-training")
    labels = [label for label, _ in rows]
    values = dict(rows)
    for naive in ("Lr", "Ema", "Kl", "Psnr", "Ssim", "Mse", "Signature", "Lr schedule", "Val lpips"):
        assert naive not in labels
    assert values["PSNR"] == "24.12 dB"
    assert values["SSIM"] == "0.7123" and values["MSE"] == "0.0039" and values["KL"] == "12.5"
    assert values["Reconstruction loss"] == "0.4"
    assert values["Training time"] == "812.4 s" and values["KL warm-up"] == "5 epochs"
    assert values["Validation LPIPS"] == "0.21"
    # Each fact once: the signature adds only what the card does not already say (here the EMA decay and
    # the channels), under "Settings".
    for label in ("Learning rate", "Seed", "Recipe", "Batch size", "Augmentation", "Prior", "Warm-up steps"):
        assert labels.count(label) == 1, label
    # The run's seed, the split's and the synthetic data's were all "Seed"; the device the run trained on
    # was "Device", as is the one the service runs on (the card's first part).
    assert labels.count("Split seed") == 1 and labels.count("Data seed") == 1
    assert values["Training device"] == "cuda:0" and "Device" not in labels
    assert values["Constructor"] == "1"
    assert labels.count("EMA") == 1 and values["EMA"] == "0.999"
    assert values["Channels per level"] == "8, 16, 16"
    assert "Settings" in labels
    for repeated in ("Data fingerprint", "Epochs", "Validation fraction", "Image size", "Resize policy"):
        assert labels.count(repeated) == (repeated == "Validation fraction"), repeated  # the split's
    assert not [e["message"] for e in browser.get_log("browser") if e.get("source") == "javascript"]


def test_usable_at_phone_width(page: Any) -> None:
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 800, "deviceScaleFactor": 2, "mobile": True},
    )
    page.refresh()
    wait_for(page, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)
    # Nothing forces sideways scrolling, and the main controls are on screen-width boxes.
    assert page.execute_script("return document.documentElement.scrollWidth") <= 375
    for element_id in ("dropzone", "sample-btn", "sliders", "interp-btn"):
        rect = page.execute_script(
            f"return document.getElementById('{element_id}').getBoundingClientRect().right"
        )
        assert rect <= 375, element_id
    screenshot(page, "web-375px")


def test_a_long_file_name_does_not_widen_the_page_on_a_phone(page: Any, tmp_path: Path) -> None:
    # The explorer's caption names the uploaded file, and a camera's or a download's name is one long
    # word: the caption did not wrap, and the whole page scrolled sideways (758 px wide at 375).
    name = "IMG_20261130_my_favourite_car_at_the_motor_show_front_three_quarter_view_final_v2.png"
    photo = car_photo(tmp_path / name, (200, 30, 40))
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 800, "deviceScaleFactor": 1, "mobile": True},
    )
    page.refresh()
    wait_for(page, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)
    upload(page, "file-input", photo)
    wait_for(page, lambda d: name in by_id(d, "latent-source").text)
    upload(page, "file-a", photo)
    assert page.execute_script("return document.documentElement.scrollWidth") <= 375
    screenshot(page, "web-375px-long-name")


def test_api_key_field_unlocks_a_protected_service(browser: Any, keyed_base_url: str) -> None:
    msg = open_without_a_key(browser, keyed_base_url)
    assert "unauthorized" in msg.text
    key_field = by_id(browser, "api-key")
    assert browser.switch_to.active_element == key_field  # focus goes where the visitor must act

    key_field.send_keys("not-the-key")
    browser.execute_script("arguments[0].textContent = ''", msg)  # so the retry's answer is seen anew
    by_id(browser, "api-key-form").submit()
    wait_for(browser, lambda d: "needs an API key" in msg.text)
    assert browser.execute_script("return document.body.dataset.ready") is None

    key_field.clear()
    key_field.send_keys(API_KEY)
    by_id(browser, "api-key-form").submit()
    wait_for(browser, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)
    assert msg.text == ""
    # The key lives in this tab's sessionStorage only, and survives a reload there.
    assert browser.execute_script("return sessionStorage.getItem('carvae.apiKey')") == API_KEY
    assert browser.execute_script("return localStorage.length") == 0
    browser.refresh()
    wait_for(browser, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)
    screenshot(browser, "web-api-key")
    browser.execute_script("sessionStorage.clear()")


def test_a_cleared_message_stays_cleared(page: Any) -> None:
    # A message is shown on the next animation frame but a clear is immediate: a clear within a frame of a
    # message must not be undone when that frame runs.
    shown = page.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        import('./static/js/util.js').then(({ say }) => {
          const el = document.getElementById('explore-msg');
          say(el, 'working on it…');
          say(el, '');
          requestAnimationFrame(() => requestAnimationFrame(() => done(el.textContent)));
        });
        """
    )
    assert shown == ""


def test_a_rate_limit_is_reported_as_busy_not_as_a_bad_photo(page: Any, photos: dict[str, Path]) -> None:
    body = json.dumps({"error": {"code": "rate_limited", "message": "slow down", "request_id": "r2"}})
    answer_in_browser(
        page, "reconstruct", 429, body, {"Content-Type": "application/json", "Retry-After": "7"}
    )
    upload(page, "file-input", photos["red"])
    msg = by_id(page, "reconstruct-msg")
    wait_for(page, lambda d: "rate_limited" in msg.text)
    assert "busy" in msg.text and "try again in 7 s" in msg.text
    assert "could not use that input" not in msg.text


def test_a_proxy_error_page_is_not_shown_as_markup(page: Any) -> None:
    html = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
    answer_in_browser(page, "decode", 502, html, {"Content-Type": "text/html"})
    by_id(page, "sample-btn").click()
    msg = by_id(page, "sample-msg")
    wait_for(page, lambda d: "http_502" in msg.text)
    assert "Bad Gateway" in msg.text
    assert "<" not in msg.text
    screenshot(page, "web-proxy-error")


def test_the_image_follows_a_slider_while_it_is_dragged(page: Any, base_url: str) -> None:
    latent_dim = model_info(base_url)["latent_dim"]
    slider = page.find_elements("css selector", "#sliders input[type=range]")[0]
    wait_for(page, lambda d: src_of(d, "latent-img").startswith("data:image/"))
    # A drag: an input event every 30 ms for 1.5 s, as a mouse moving the thumb sends them.
    updates_during_drag = page.execute_async_script(
        """
        const [slider, done] = [arguments[0], arguments[arguments.length - 1]];
        const img = document.getElementById('latent-img');
        let updates = 0;
        new MutationObserver(() => updates++).observe(img, {attributes: true, attributeFilter: ['src']});
        let step = 0;
        const timer = setInterval(() => {
          slider.value = String(-3 + step * 0.1);
          slider.dispatchEvent(new Event('input', {bubbles: true}));
          if (++step === 50) {
            clearInterval(timer);
            done(updates);
          }
        }, 30);
        """,
        slider,
    )
    assert updates_during_drag >= 2
    # When the drag stops, the image is the decode of where the slider ended, not of a stale position.
    z = [0.0] * latent_dim
    z[int(slider.get_attribute("data-dim"))] = float(slider.get_attribute("value"))
    expected = decode_via_api(base_url, [z])[0]
    wait_for(
        page,
        lambda d: np.array_equal(np.asarray(data_url_pixels(src_of(d, "latent-img")), float), expected),
    )


def test_a_failed_interpolation_hides_the_previous_frames(page: Any, photos: dict[str, Path]) -> None:
    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    by_id(page, "interp-btn").click()
    wait_for(page, lambda d: len(d.find_elements("css selector", "#strip img")) == 8)
    assert by_id(page, "player").is_displayed()

    upload(page, "file-b", photos["text"])
    by_id(page, "interp-btn").click()
    msg = by_id(page, "interp-msg")
    wait_for(page, lambda d: "unsupported_media_type" in msg.text)
    assert not by_id(page, "player").is_displayed()
    # Stopped, not just hidden: the frame no longer changes.
    shown = src_of(page, "frame-img")
    page.execute_script("return new Promise((r) => setTimeout(r, 500))")
    assert src_of(page, "frame-img") == shown
    assert by_id(page, "play").get_attribute("data-playing") == "false"
    screenshot(page, "web-interpolate-error")


def test_changing_a_car_marks_the_frames_as_the_previous_pairs(
    page: Any, photos: dict[str, Path], tmp_path: Path
) -> None:
    # After another car B was picked, the red-to-blue frames kept playing at full strength and their text
    # alternative still said "between car A and car B", as if they were the new pair's answer.
    green = car_photo(tmp_path / "green-car.png", (40, 160, 60))

    def looks_current() -> bool:
        alt = str(by_id(page, "frame-img").get_attribute("alt"))
        dim = float(
            page.execute_script("return getComputedStyle(arguments[0]).opacity", by_id(page, "frame-img"))
        )
        return alt.startswith("Frame ") and "between car A and car B" in alt and dim == 1

    def looks_previous(a: str, b: str) -> bool:
        alt = str(by_id(page, "frame-img").get_attribute("alt"))
        dim = float(
            page.execute_script("return getComputedStyle(arguments[0]).opacity", by_id(page, "frame-img"))
        )
        notes = [n.text for n in page.find_elements("id", "interp-stale") if n.is_displayed()]
        return (
            alt.startswith("Previous pair") and a in alt and b in alt and dim < 0.5
            and len(notes) == 1 and a in notes[0] and b in notes[0]
            and by_id(page, "play").get_attribute("data-playing") == "false"
        )  # fmt: skip

    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    by_id(page, "interp-btn").click()
    msg = by_id(page, "interp-msg")
    wait_for(page, lambda d: "from “red-car.png” to “blue-car.png”" in msg.text)
    assert looks_current() and not [n for n in page.find_elements("id", "interp-stale") if n.is_displayed()]

    upload(page, "file-b", green)
    assert by_id(page, "player").is_displayed()  # kept, to compare with, but not as the answer
    assert looks_previous("red-car.png", "blue-car.png")
    screenshot(page, "web-interpolate-previous-pair")

    by_id(page, "interp-btn").click()
    wait_for(page, lambda d: "from “red-car.png” to “green-car.png”" in msg.text)
    assert looks_current() and not [n for n in page.find_elements("id", "interp-stale") if n.is_displayed()]

    # A car picked while the frames are on their way: they arrive as the previous pair's.
    hold_in_browser(page, "interpolate")
    steps = by_id(page, "steps")
    steps.clear()
    steps.send_keys("4")
    by_id(page, "interp-btn").click()
    upload(page, "file-a", photos["blue"])
    release_in_browser(page)
    wait_for(page, lambda d: "4 frames" in msg.text)
    assert len(page.find_elements("css selector", "#strip img")) == 4
    assert looks_previous("red-car.png", "green-car.png")


def test_the_previous_pairs_frames_cannot_be_played_until_the_new_ones_come(
    page: Any, photos: dict[str, Path], tmp_path: Path
) -> None:
    # Dimmed and labelled as the previous pair's once car B was changed, the frames still played at a press
    # of Play (or moved with the frame slider or a frame of the strip), as if they were the answer.
    from selenium.webdriver.common.keys import Keys

    green = car_photo(tmp_path / "green-car.png", (40, 160, 60))
    reason = "These are the previous pair's frames: press Interpolate for the cars chosen now"

    def controls() -> list[Any]:
        strip = page.find_elements("css selector", "#strip button")
        return [by_id(page, "play"), by_id(page, "frame"), *strip]

    def disabled_for_a_screen_reader(element_id: str) -> bool:
        props = {p["name"]: p["value"].get("value") for p in ax_node(page, element_id).get("properties", [])}
        return props.get("disabled") is True

    def focused() -> str:
        return str(page.execute_script("return document.activeElement.id"))

    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    by_id(page, "interp-btn").click()
    msg = by_id(page, "interp-msg")
    wait_for(page, lambda d: "from “red-car.png” to “blue-car.png”" in msg.text)
    play = by_id(page, "play")
    if play.get_attribute("data-playing") == "true":
        play.click()  # the player starts by itself unless reduced motion is asked for
    assert focused() == "play" and all(c.is_enabled() for c in controls())

    # Dropped with the mouse, so the keyboard focus is still on Play.
    drop_on(page, "drop-b", png=green)
    wait_for(page, lambda d: by_id(d, "interp-stale").is_displayed())
    assert not [c for c in controls() if c.is_enabled()]
    assert disabled_reason(page, "play") == (reason, reason)
    assert disabled_reason(page, "frame") == (reason, reason)
    assert disabled_for_a_screen_reader("play") and disabled_for_a_screen_reader("frame")
    # On to what the note says to press, not dropped to the page's start.
    assert focused() == "interp-btn"
    shown = src_of(page, "frame-img")
    page.execute_script("arguments[0].click()", play)
    page.execute_script("return new Promise((r) => setTimeout(r, 500))")
    assert play.get_attribute("data-playing") == "false" and src_of(page, "frame-img") == shown
    screenshot(page, "web-interpolate-previous-pair-disabled")

    page.switch_to.active_element.send_keys(Keys.ENTER)
    wait_for(page, lambda d: "from “red-car.png” to “green-car.png”" in msg.text)
    assert all(c.is_enabled() for c in controls())
    assert disabled_reason(page, "play") == ("", "") and disabled_reason(page, "frame") == ("", "")
    assert not disabled_for_a_screen_reader("play")
    if play.get_attribute("data-playing") == "true":
        play.click()
    shown = src_of(page, "frame-img")
    play.click()
    wait_for(page, lambda d: src_of(d, "frame-img") != shown)  # the new pair plays


def test_choosing_the_same_photo_again_keeps_the_frames_current(page: Any, photos: dict[str, Path]) -> None:
    # The same file chosen again (a second look in the file dialog) marked its own frames as "the previous
    # pair, “red-car.png” and “blue-car.png”", beside a car A and car B of those very names.
    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    by_id(page, "interp-btn").click()
    msg = by_id(page, "interp-msg")
    wait_for(page, lambda d: "from “red-car.png” to “blue-car.png”" in msg.text)
    upload(page, "file-b", photos["blue"])
    assert by_id(page, "name-b").text == "blue-car.png"
    assert not by_id(page, "interp-stale").is_displayed()
    assert by_id(page, "play").is_enabled()
    assert str(by_id(page, "frame-img").get_attribute("alt")).startswith("Frame ")


def test_a_failed_interpolation_names_the_car_the_service_could_not_use(
    page: Any, photos: dict[str, Path]
) -> None:
    # The service names the file by its form field ("file_b: the file is not an image …"), which the page
    # showed as it was, and the pixel limit was blamed on "car A or car B" although the service said which.
    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["text"])
    by_id(page, "interp-btn").click()
    msg = by_id(page, "interp-msg")
    wait_for(page, lambda d: "unsupported_media_type" in msg.text)
    assert "could not use car B (“notes.txt”): the file is not an image" in msg.text
    assert "file_b" not in msg.text

    error = {
        "code": "image_too_large",
        "message": "file_a: image is 9000×9000 = 81000000 pixels",
        "request_id": "r6",
    }
    answer_in_browser(
        page, "interpolate", 413, json.dumps({"error": error}), {"Content-Type": "application/json"}
    )
    by_id(page, "interp-btn").click()
    wait_for(page, lambda d: "image_too_large" in msg.text)
    assert msg.text.startswith(
        "Car A (“red-car.png”) has too many pixels for the service (image is 9000×9000"
    )
    assert "file_a" not in msg.text and "car A or car B" not in msg.text


def test_the_latent_image_stays_in_sight_while_sliders_are_used_on_a_phone(page: Any) -> None:
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 700, "deviceScaleFactor": 2, "mobile": True},
    )
    page.refresh()
    wait_for(page, lambda d: len(d.find_elements("css selector", "#sliders input[type=range]")) > 1)
    sliders = page.find_elements("css selector", "#sliders input[type=range]")

    def overlap(a: dict[str, float], b: dict[str, float]) -> bool:
        return a["top"] < b["bottom"] and b["top"] < a["bottom"]

    # Keyboard use: focusing a slider scrolls it into view, the last one and then back to the first.
    for slider in (sliders[-1], sliders[0]):
        page.execute_script("arguments[0].focus()", slider)
        img, focused, height = page.execute_script(
            """return [document.getElementById('latent-img').getBoundingClientRect().toJSON(),
                       arguments[0].getBoundingClientRect().toJSON(), window.innerHeight]""",
            slider,
        )
        assert img["top"] >= 0 and img["bottom"] <= height, img  # the image is on screen
        assert focused["top"] >= 0 and focused["bottom"] <= height, focused  # so is the slider
        assert not overlap(img, focused)  # and the image does not cover it
    screenshot(page, "web-375px-sliders")


def test_a_reload_reuses_the_slider_ranking(page: Any) -> None:
    order = [s.get_attribute("data-dim") for s in page.find_elements("css selector", "#sliders input")]
    # Count the latent rows the reloaded page sends to /decode, from before its own scripts run.
    counter = page.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": """
            window.decodedRows = 0;
            const real = window.fetch;
            window.fetch = (url, opts) => {
              if (String(url).endsWith('decode')) window.decodedRows += JSON.parse(opts.body).z.length;
              return real(url, opts);
            };
            """
        },
    )
    try:
        page.refresh()
        wait_for(page, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)
        wait_for(page, lambda d: src_of(d, "latent-img").startswith("data:image/"))
        again = [s.get_attribute("data-dim") for s in page.find_elements("css selector", "#sliders input")]
        assert again == order
        # The 16 samples and the image at z = 0; the ranking's latent_dim + 1 probes are not sent again.
        assert page.execute_script("return window.decodedRows") == 16 + 1
    finally:
        page.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", counter)


def test_a_busy_service_at_start_still_gets_the_sliders_ranked(page: Any) -> None:
    # The ranking's /decode calls come right after the model card, when a loaded service may answer 503.
    # One such answer left the sliders unranked (dimensions 0-11) for good, and the message saying so was
    # wiped by the next decode within a second, while the help text still promised an order.
    def order(d: Any) -> list[str]:
        return [s.get_attribute("data-dim") for s in d.find_elements("css selector", "#sliders input")]

    def load_refusing(refusals: int) -> None:
        """Reload with no saved ranking; its first `refusals` ranking calls get 503 (more than one row, and
        not the sample grid's 16)."""
        script = page.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument",
            {
                "source": f"sessionStorage.clear(); window.refuse = {refusals};"
                + """
                const real = window.fetch;
                window.fetch = (url, opts = {}) => {
                  const rows = String(url).endsWith('decode') ? JSON.parse(opts.body).z.length : 0;
                  if (rows > 1 && rows !== 16 && window.refuse-- > 0) {
                    return Promise.resolve(new Response(
                      JSON.stringify({error: {code: 'overloaded', message: 'queue full', request_id: 'r5'}}),
                      {status: 503, headers: {'Content-Type': 'application/json', 'Retry-After': '0'}}));
                  }
                  return real(url, opts);
                };
                """
            },
        )
        try:
            page.refresh()
            wait_for(page, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)
        finally:
            page.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)

    ranked = order(page)
    load_refusing(2)
    wait_for(page, lambda d: order(d) == ranked, timeout=10)
    assert by_id(page, "explore-msg").text == ""

    # A service that stays busy: the sliders come unranked, and the message saying so stays after the
    # explorer's own decodes succeed.
    load_refusing(1000)
    msg = by_id(page, "explore-msg")
    wait_for(page, lambda d: "unranked" in msg.text)
    assert order(page) == [str(d) for d in range(len(ranked))]
    by_id(page, "latent-zero").click()
    page.execute_script("return new Promise((r) => setTimeout(r, 1000))")
    assert "unranked" in msg.text and "reload the page" in msg.text and "overloaded" in msg.text
    page.execute_script("sessionStorage.clear()")  # the next test's load ranks as usual


def test_pressing_sample_or_interpolate_keeps_the_keyboard_focus(page: Any, photos: dict[str, Path]) -> None:
    # The buttons were disabled while their request ran, and Chromium moves the focus off a disabled
    # element to the page itself: a keyboard user pressing Enter lost their place.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    focused = "return document.activeElement.id"
    seed = by_id(page, "seed")
    seed.clear()
    seed.send_keys("4321")
    page.execute_script("document.getElementById('sample-btn').focus()")
    ActionChains(page).send_keys(Keys.ENTER).perform()
    wait_for(page, lambda d: "seed 4321," in by_id(d, "sample-msg").text)
    assert page.execute_script(focused) == "sample-btn"

    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    page.execute_script("document.getElementById('interp-btn').focus()")
    ActionChains(page).send_keys(Keys.SPACE).perform()
    wait_for(page, lambda d: len(d.find_elements("css selector", "#strip img")) == 8)
    assert page.execute_script(focused) == "interp-btn"


def test_a_second_press_supersedes_and_cancels_the_request_in_flight(
    page: Any, photos: dict[str, Path]
) -> None:
    # A double-click, or a second try while a slow answer is on its way: the newer request is the one
    # shown, and the older one is cancelled rather than left to upload and run for nothing.
    seed = by_id(page, "seed")
    seed.clear()
    seed.send_keys("77")
    delay_in_browser(page, "decode", [3000, 0])
    button = by_id(page, "sample-btn")
    button.click()
    seed.clear()
    seed.send_keys("78")
    button.click()
    wait_for(page, lambda d: "seed 78," in by_id(d, "sample-msg").text)
    assert page.execute_script("return window.heldCalls.map((c) => c.aborted)") == [True, False]
    page.execute_script("return new Promise((r) => setTimeout(r, 3500))")  # the first answer's old time
    assert "seed 78," in by_id(page, "sample-msg").text

    delay_in_browser(page, "reconstruct", [3000, 0])
    upload(page, "file-input", photos["red"])
    upload(page, "file-input", photos["blue"])
    wait_for(page, lambda d: "Reconstructed “blue-car.png”" in by_id(d, "reconstruct-msg").text)
    assert page.execute_script("return window.heldCalls.map((c) => c.aborted)") == [True, False]


def test_the_interpolation_names_the_files_it_was_made_from(page: Any, photos: dict[str, Path]) -> None:
    # Picking another car A while the frames are on their way must not relabel those frames as the new
    # file's: the message named the files chosen when the answer came, not the ones sent.
    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    delay_in_browser(page, "interpolate", [2000])
    by_id(page, "interp-btn").click()
    upload(page, "file-a", photos["blue"])
    msg = by_id(page, "interp-msg")
    wait_for(page, lambda d: "frames from" in msg.text)
    assert "8 frames from “red-car.png” to “blue-car.png”" in msg.text


def test_a_slow_upload_does_not_replace_a_sample_picked_meanwhile(page: Any, photos: dict[str, Path]) -> None:
    # The upload's latent used to be loaded into the explorer whenever its answer came, over a sample the
    # visitor had selected after starting the upload (whose button still showed as pressed).
    delay_in_browser(page, "reconstruct", [2500])
    upload(page, "file-input", photos["red"])
    sample = page.find_elements("css selector", "#sample-grid button")[2]
    sample.click()
    wait_for(page, lambda d: "Sample 3 (seed" in by_id(d, "latent-source").text)
    wait_for(page, lambda d: "Reconstructed “red-car.png”" in by_id(d, "reconstruct-msg").text)
    assert by_id(page, "compare").is_displayed()  # the reconstruction itself is shown as always
    page.execute_script("return new Promise((r) => setTimeout(r, 500))")
    assert "Sample 3 (seed" in by_id(page, "latent-source").text
    assert sample.get_attribute("aria-pressed") == "true"
    picked = sample.find_element("css selector", "img").get_attribute("src")
    wait_for(page, lambda d: same_picture(src_of(d, "latent-img"), picked))

    # With nothing loaded meanwhile, an upload still brings its latent into the explorer.
    upload(page, "file-input", photos["blue"])
    wait_for(page, lambda d: "blue-car.png" in by_id(d, "latent-source").text)


def ax_node(page: Any, element_id: str) -> dict[str, Any]:
    """Chromium's accessibility node for an element (what a screen reader is given)."""
    root = page.execute_cdp_cmd("DOM.getDocument", {})["root"]["nodeId"]
    node = page.execute_cdp_cmd("DOM.querySelector", {"nodeId": root, "selector": f"#{element_id}"})
    tree = page.execute_cdp_cmd(
        "Accessibility.getPartialAXTree", {"nodeId": node["nodeId"], "fetchRelatives": False}
    )
    return dict(tree["nodes"][0])


def test_empty_status_messages_stay_in_the_accessibility_tree(page: Any) -> None:
    # The messages are aria-live regions. Hidden with display: none while empty, they were out of the
    # accessibility tree, so each message arrived as a new region instead of a change to a watched one,
    # which screen readers may not announce; say() clearing first to re-announce a repeat did not help.
    for element_id in ("global-msg", "reconstruct-msg", "explore-msg", "interp-msg"):
        assert by_id(page, element_id).text == ""
        node = ax_node(page, element_id)
        assert not node.get("ignored"), (element_id, node.get("ignoredReasons"))
        # Still nothing to see: an empty message takes no room.
        height = page.execute_script(
            "return document.getElementById(arguments[0]).getBoundingClientRect().height", element_id
        )
        assert height == 0, element_id


def test_slider_readouts_are_not_live_regions(page: Any, photos: dict[str, Path]) -> None:
    # An <output> is an implicit polite live region (role status). The player's "Frame k of n" changes
    # seven times a second while it plays, and loading a code changes the 12 latent readouts at once:
    # a screen reader was handed all of that as announcements. Each slider speaks its own value instead,
    # and the frame slider's says which frame (its value is 0-based).
    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    by_id(page, "interp-btn").click()
    wait_for(page, lambda d: len(d.find_elements("css selector", "#strip img")) == 8)
    for output in page.find_elements("css selector", "output"):
        page.execute_script("arguments[0].dataset.probe = '1'", output)
        root = page.execute_cdp_cmd("DOM.getDocument", {})["root"]["nodeId"]
        node_id = page.execute_cdp_cmd("DOM.querySelector", {"nodeId": root, "selector": "[data-probe]"})
        tree = page.execute_cdp_cmd(
            "Accessibility.getPartialAXTree", {"nodeId": node_id["nodeId"], "fetchRelatives": False}
        )
        page.execute_script("delete arguments[0].dataset.probe", output)
        props = {p["name"]: p["value"].get("value") for p in tree["nodes"][0].get("properties", [])}
        assert props.get("live", "off") == "off", (output.get_attribute("for"), props)

    from selenium.webdriver.common.keys import Keys

    play = by_id(page, "play")
    if play.get_attribute("data-playing") == "true":
        play.click()
    frame = by_id(page, "frame")
    frame.send_keys(Keys.END)
    assert frame.get_attribute("aria-valuetext") == "Frame 8 of 8"


def test_a_file_the_browser_cannot_draw_gets_no_broken_thumbnail(page: Any, photos: dict[str, Path]) -> None:
    # Car A/B show a thumbnail of the picked file; for a file the browser cannot draw (not an image, or a
    # TIFF, which the service reads) that was a broken-image icon with its alt text cut off.
    upload(page, "file-b", photos["text"])
    wait_for(page, lambda d: by_id(d, "name-b").text == "notes.txt")
    page.execute_script("return new Promise((r) => setTimeout(r, 300))")  # time to load, or to fail
    assert not by_id(page, "thumb-b").is_displayed()

    upload(page, "file-b", photos["blue"])
    wait_for(page, lambda d: by_id(d, "thumb-b").is_displayed())
    assert page.execute_script("return document.getElementById('thumb-b').naturalWidth") > 0
    assert "blue-car.png" in by_id(page, "thumb-b").get_attribute("alt")


def test_a_refused_api_key_is_reported_as_refused(browser: Any, keyed_base_url: str) -> None:
    # After saving a wrong key the page said "needs an API key: open “API key” … and enter it", as if
    # the key just entered had been ignored.
    msg = open_without_a_key(browser, keyed_base_url)
    assert "enter it" in msg.text and "refused" not in msg.text  # no key yet: ask for one

    by_id(browser, "api-key").send_keys("not-the-key")
    browser.execute_script("arguments[0].textContent = ''", msg)
    by_id(browser, "api-key-form").submit()
    wait_for(browser, lambda d: "needs an API key" in msg.text)
    assert "the one saved in this tab was refused" in msg.text
    assert "enter it" not in msg.text
    assert "unauthorized" in msg.text
    browser.execute_script("sessionStorage.clear()")


def test_a_sample_reads_as_pressed_only_while_its_code_is_in_the_explorer(
    page: Any, photos: dict[str, Path]
) -> None:
    # aria-pressed on a sampled car says "this one is loaded in the sliders". It stayed "true" after an
    # upload or "Go to z = 0" replaced that code, so a screen reader announced a stale selection.
    def pressed() -> list[int]:
        buttons = page.find_elements("css selector", "#sample-grid button")
        return [i for i, b in enumerate(buttons) if b.get_attribute("aria-pressed") == "true"]

    buttons = page.find_elements("css selector", "#sample-grid button")
    buttons[2].click()
    buttons[4].click()
    assert pressed() == [4]
    upload(page, "file-input", photos["red"])
    wait_for(page, lambda d: "red-car.png" in by_id(d, "latent-source").text)
    assert pressed() == []

    buttons[1].click()
    assert pressed() == [1]
    by_id(page, "latent-zero").click()
    assert "z = 0" in by_id(page, "latent-source").text
    assert pressed() == []


def test_waiting_for_the_model_is_announced_once(browser: Any, base_url: str) -> None:
    # While /v1/model answers 503 the page retries every second; it re-set its "still loading" message
    # on each try, and say() clears a message first precisely so that a screen reader reads it again.
    script = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": """
            window.modelCalls = 0;
            window.loadingShown = 0;
            const real = window.fetch;
            window.fetch = (url, opts) => {
              if (String(url).endsWith('v1/model') && ++window.modelCalls <= 3) {
                return Promise.resolve(new Response(
                  JSON.stringify({error: {code: 'not_ready', message: 'starting up', request_id: 'r3'}}),
                  {status: 503, headers: {'Content-Type': 'application/json'}}));
              }
              return real(url, opts);
            };
            document.addEventListener('DOMContentLoaded', () => {
              const msg = document.getElementById('global-msg');
              new MutationObserver(() => {
                if (msg.textContent.includes('still loading')) window.loadingShown++;
              }).observe(msg, {childList: true, characterData: true, subtree: true});
            });
            """
        },
    )
    try:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.get(f"{base_url}/")
        wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        assert browser.execute_script("return window.modelCalls") == 4
        assert browser.execute_script("return window.loadingShown") == 1
        assert by_id(browser, "global-msg").text == ""
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)


def test_the_docs_page_renders_under_its_content_security_policy(browser: Any, base_url: str) -> None:
    """/docs runs Swagger UI's inline start-up script, allowed by its hash (service.docs.with_policy):
    the operations must render, and the policy must block nothing on the way."""
    browser.get_log("browser")
    browser.get(f"{base_url}/docs")
    wait_for(browser, lambda d: len(d.find_elements("css selector", ".opblock")) >= 5)
    opblock = browser.find_element("css selector", ".opblock-summary")
    opblock.click()  # expands: Swagger renders the operation's form (more inline styles, icons)
    wait_for(browser, lambda d: d.find_elements("css selector", ".opblock-body"))
    blocked = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not blocked
    screenshot(browser, "docs-under-csp")


def test_progress_messages_are_not_inside_a_busy_region(page: Any, photos: dict[str, Path]) -> None:
    # aria-busy was set on each whole section while its request ran, so a screen reader that honours it
    # held back the section's own live message ("Reconstructing …") until the answer replaced it. Only
    # the result area is busy now.
    def busy_ancestor(element_id: str) -> Any:
        return page.execute_script(
            "const b = document.getElementById(arguments[0]).closest('[aria-busy=true]'); return b && b.id",
            element_id,
        )

    delay_in_browser(page, "reconstruct", [2500])
    upload(page, "file-input", photos["red"])
    wait_for(page, lambda d: "Reconstructing" in by_id(d, "reconstruct-msg").text)
    assert busy_ancestor("reconstruct-msg") is None
    assert by_id(page, "compare").get_attribute("aria-busy") == "true"
    wait_for(page, lambda d: "Reconstructed" in by_id(d, "reconstruct-msg").text)
    assert by_id(page, "compare").get_attribute("aria-busy") is None

    delay_in_browser(page, "decode", [2500])
    by_id(page, "sample-btn").click()
    wait_for(page, lambda d: "Sampling" in by_id(d, "sample-msg").text)
    assert busy_ancestor("sample-msg") is None
    assert by_id(page, "sample-grid").get_attribute("aria-busy") == "true"

    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    delay_in_browser(page, "interpolate", [2500])
    by_id(page, "interp-btn").click()
    wait_for(page, lambda d: "Interpolating" in by_id(d, "interp-msg").text)
    assert busy_ancestor("interp-msg") is None
    assert by_id(page, "player").get_attribute("aria-busy") == "true"
    wait_for(page, lambda d: "frames from" in by_id(d, "interp-msg").text)

    by_id(page, "latent-zero").click()  # a decode for the explorer
    assert busy_ancestor("explore-msg") is None


def test_error_messages_say_what_happened_and_what_to_do(page: Any, photos: dict[str, Path]) -> None:
    def error(code: str, message: str) -> str:
        return json.dumps({"error": {"code": code, "message": message, "request_id": "r9"}})

    json_type = {"Content-Type": "application/json"}
    # Two files that together exceed the upload limit: neither one is "that file".
    answer_in_browser(
        page,
        "interpolate",
        413,
        error("payload_too_large", "request body is larger than the limit"),
        json_type,
    )
    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    by_id(page, "interp-btn").click()
    msg = by_id(page, "interp-msg")
    wait_for(page, lambda d: "payload_too_large" in msg.text)
    assert "together" in msg.text and "red-car.png" in msg.text and "blue-car.png" in msg.text
    assert "That file" not in msg.text

    # An image over the pixel limit is not a file that is too large to send.
    answer_in_browser(page, "reconstruct", 413, error("image_too_large", "image is 9000×9000"), json_type)
    upload(page, "file-input", photos["red"])
    msg = by_id(page, "reconstruct-msg")
    wait_for(page, lambda d: "image_too_large" in msg.text)
    assert "too many pixels" in msg.text and "Scale the picture down" in msg.text

    # A slow upload (the body did not arrive in time) is not an input the service could not use.
    answer_in_browser(
        page,
        "reconstruct",
        408,
        error("request_timeout", "the request body did not arrive within 30 s"),
        json_type,
    )
    upload(page, "file-input", photos["blue"])
    wait_for(page, lambda d: "request_timeout" in msg.text)
    assert "not reach the service in time" in msg.text and "try again" in msg.text
    assert "could not use that input" not in msg.text


def test_a_page_opened_while_the_service_is_unreachable_starts_when_it_answers(
    browser: Any, base_url: str, photos: dict[str, Path]
) -> None:
    # With no answer at all to GET /v1/model (a network error, not the 503 while loading) the page showed
    # "Model unavailable" for good: its sections never started and a photo picked then did nothing at all.
    script = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": """
            window.serviceDown = true;
            window.modelCalls = 0;
            const real = window.fetch;
            window.fetch = (url, opts) => {
              if (String(url).endsWith('v1/model')) window.modelCalls++;
              return window.serviceDown ? Promise.reject(new TypeError('Failed to fetch')) : real(url, opts);
            };
            """
        },
    )
    try:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.get_log("browser")
        browser.get(f"{base_url}/")
        msg = by_id(browser, "global-msg")
        wait_for(browser, lambda d: "be reached" in msg.text)
        wait_for(browser, lambda d: d.execute_script("return window.modelCalls") >= 2)  # it tries again
        assert "keeps trying" in msg.text  # and says so

        # A photo picked meanwhile is acknowledged at once, and reconstructed once the service answers.
        upload(browser, "file-input", photos["red"])
        recon_msg = by_id(browser, "reconstruct-msg")
        wait_for(browser, lambda d: "red-car.png" in recon_msg.text, timeout=3)
        assert "as soon as" in recon_msg.text
        # "Sample" would otherwise submit its form natively, reloading the page.
        browser.execute_script("window.stillThisPage = true")
        by_id(browser, "sample-btn").click()
        wait_for(browser, lambda d: "as soon as" in by_id(d, "sample-msg").text, timeout=3)
        assert browser.execute_script("return window.stillThisPage") is True

        browser.execute_script("window.serviceDown = false")
        wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        assert msg.text == ""
        wait_for(browser, lambda d: "Reconstructed “red-car.png”" in recon_msg.text)
        assert by_id(browser, "compare").is_displayed()
        wait_for(browser, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)
        # The tries are spaced out: a few a second apart, then backing off (not hammering the service).
        assert browser.execute_script("return window.modelCalls") <= 12
        assert not [e for e in browser.get_log("browser") if e.get("source") == "javascript"]
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)


@pytest.mark.parametrize(("status", "code"), [(503, "overloaded"), (429, "rate_limited")])
def test_an_overloaded_service_at_start_is_called_busy_not_loading(
    browser: Any, base_url: str, status: int, code: str
) -> None:
    # Every 503 from /v1/model read "The model is still loading…", an overloaded service's too. A rate
    # limiter's 429 in front of it (overload by another name) stopped the page for good: "Model
    # unavailable", and "try again in 1 s" with nothing to try but a reload.
    script = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": f"window.answer = [{status}, '{code}'];"
            + """
            window.modelCalls = 0;
            window.shown = [];
            const real = window.fetch;
            window.fetch = (url, opts) => {
              if (String(url).endsWith('v1/model') && ++window.modelCalls <= 2) {
                return Promise.resolve(new Response(
                  JSON.stringify({error: {code: window.answer[1], message: 'queue full', request_id: 'r4'}}),
                  {status: window.answer[0],
                   headers: {'Content-Type': 'application/json', 'Retry-After': '1'}}));
              }
              return real(url, opts);
            };
            document.addEventListener('DOMContentLoaded', () => {
              const msg = document.getElementById('global-msg');
              new MutationObserver(() => window.shown.push(msg.textContent))
                .observe(msg, {childList: true, characterData: true, subtree: true});
            });
            """
        },
    )
    try:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.get(f"{base_url}/")
        wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        shown = [text for text in browser.execute_script("return window.shown") if text]
        assert shown and all("busy" in text for text in shown), shown
        assert not any("loading" in text for text in shown), shown
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)


def test_sliders_are_named_without_their_changing_readout(page: Any, photos: dict[str, Path]) -> None:
    # The frame slider's <label> held its "k of n" readout, so by accname's rule (a label's descendants
    # make the name) its name changed with every frame during playback, and the temperature's as it moved.
    # Chromium happens to leave an <output> out of a label's text, so its tree said "Frame" even then: the
    # check is that nothing the name comes from holds a readout, and then that the name is the bare word.
    readouts_in_name = """
        const s = document.getElementById(arguments[0]);
        const ids = (s.getAttribute('aria-labelledby') || '').split(/\\s+/).filter(Boolean);
        const from = ids.length ? ids.map((id) => document.getElementById(id)) : [...s.labels];
        return from.length ? from.filter((e) => e.matches('output') || e.querySelector('output')).length : -1;
    """
    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    by_id(page, "interp-btn").click()
    wait_for(page, lambda d: len(d.find_elements("css selector", "#strip img")) == 8)
    from selenium.webdriver.common.keys import Keys

    play = by_id(page, "play")
    if play.get_attribute("data-playing") == "true":
        play.click()
    frame = by_id(page, "frame")
    frame.send_keys(Keys.END)
    for slider_id in ("frame", "temperature"):
        assert page.execute_script(readouts_in_name, slider_id) == 0, slider_id
    assert ax_node(page, "frame")["name"]["value"] == "Frame"
    assert frame.get_attribute("aria-valuetext") == "Frame 8 of 8"
    by_id(page, "temperature").send_keys(Keys.RIGHT)
    assert ax_node(page, "temperature")["name"]["value"] == "Temperature"
    assert by_id(page, "temperature-out").text == "1.1"


def test_the_sample_grid_is_one_tab_stop_with_arrow_keys_inside(page: Any) -> None:
    # The 16 sampled cars were 16 tab stops between "Sample" and the interpolation.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    def press(key: str) -> Any:
        ActionChains(page).send_keys(key).perform()
        return page.execute_script(
            "const a = document.activeElement, all = [...document.querySelectorAll('#sample-grid button')];"
            "return all.includes(a) ? all.indexOf(a) : a.id"
        )

    page.execute_script("document.getElementById('sample-btn').focus()")
    assert press(Keys.TAB) == 0
    assert press(Keys.RIGHT) == 1
    columns = page.execute_script(
        "const b = [...document.querySelectorAll('#sample-grid button')];"
        "return b.filter(x => x.getBoundingClientRect().top === b[0].getBoundingClientRect().top).length"
    )
    assert press(Keys.DOWN) == 1 + columns
    assert press(Keys.UP) == 1
    assert press(Keys.END) == 15
    assert press(Keys.RIGHT) == 15  # no wrapping, and no scrolling either
    assert press(Keys.HOME) == 0
    assert press(Keys.END) == 15
    assert press(Keys.TAB) == "file-a"  # out of the grid in one step
    ActionChains(page).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
    assert press(Keys.ARROW_LEFT) == 14  # back to the car focused last, and on from there
    assert (
        page.execute_script("return document.querySelectorAll('#sample-grid button[tabindex=\"0\"]').length")
        == 1
    )
    press(Keys.ENTER)
    wait_for(page, lambda d: "Sample 15 (seed" in by_id(d, "latent-source").text)
    # A new grid starts again at its first car.
    by_id(page, "sample-btn").click()
    wait_for(
        page,
        lambda d: d.execute_script("return document.querySelector('#sample-grid button').tabIndex === 0"),
    )


def test_every_control_is_named_starting_with_its_visible_text(page: Any, photos: dict[str, Path]) -> None:
    # WCAG 2.5.3 (label in name): someone using speech input says what they see. "New seed" was named
    # "Pick a new random seed", so "click New seed" found nothing.
    upload(page, "file-input", photos["red"])
    upload(page, "file-a", photos["red"])
    upload(page, "file-b", photos["blue"])
    by_id(page, "interp-btn").click()
    wait_for(page, lambda d: by_id(d, "play").is_displayed() and by_id(d, "download").is_displayed())
    by_id(page, "api-key-box").click()  # opens it: its buttons are shown
    wait_for(page, lambda d: by_id(d, "api-key-clear").is_displayed())

    def words(s: str) -> str:
        return " ".join(s.split()).lower()

    checked = []
    for element in page.find_elements("css selector", "button, a[href], summary, [role=button]"):
        text = words(element.text) if element.is_displayed() else ""
        if not text:
            continue  # nothing visible to say (a sampled car: its picture's alt text names it)
        name = words(element.accessible_name)
        assert name.startswith(text), (element.get_attribute("id") or element.tag_name, text, name)
        checked.append(text)
    assert {"new seed", "reset sliders", "go to z = 0", "save", "clear"} <= set(checked)
    assert {"play", "pause"} & set(checked) and "download the reconstruction" in checked
    # The longer explanation is still there, as a tooltip.
    assert "random seed" in (by_id(page, "new-seed").get_attribute("title") or "").lower()


def test_the_explorer_buttons_wait_for_the_model_card(browser: Any, base_url: str) -> None:
    # Before the page reached the service, "Reset sliders" and "Go to z = 0" looked ready but did nothing
    # and said nothing.
    script = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": """
            window.serviceDown = true;
            const real = window.fetch;
            window.fetch = (url, opts) =>
              window.serviceDown ? Promise.reject(new TypeError('Failed to fetch')) : real(url, opts);
            """
        },
    )
    try:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.get(f"{base_url}/")
        wait_for(browser, lambda d: "be reached" in by_id(d, "global-msg").text)
        buttons = [by_id(browser, "latent-reset"), by_id(browser, "latent-zero")]
        assert [b.is_enabled() for b in buttons] == [False, False]
        # Saying why, to a pointer (the tooltip) and to a screen reader (the description).
        for element_id in ("latent-reset", "latent-zero"):
            title, description = disabled_reason(browser, element_id)
            assert "once the page has loaded the model" in title and description == title

        browser.execute_script("window.serviceDown = false")
        wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        wait_for(browser, lambda d: all(b.is_enabled() for b in buttons))
        assert [disabled_reason(browser, b.get_attribute("id")) for b in buttons] == [("", "")] * 2
        wait_for(browser, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)
        browser.find_element("css selector", "#sample-grid button").click()
        wait_for(browser, lambda d: "Sample 1" in by_id(d, "latent-source").text)
        buttons[1].click()  # and they act
        assert "z = 0" in by_id(browser, "latent-source").text
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)


def another_model(folder: Path) -> Path:
    """A checkpoint of another model than tiny_checkpoint (z 4, not 8), to restart a service with."""
    torch.manual_seed(1)
    path = folder / "other.safetensors"
    save_checkpoint(
        path, VAE(VAEConfig(image_size=32, latent_dim=4, channels=(8, 16, 16))), PreprocessPolicy(32)
    )
    return path


@contextlib.contextmanager
def page_of_the_tiny_model(browser: Any, tiny_checkpoint: Path, tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """The page opened on a service of tiny_checkpoint, ready, while that service runs; yields another
    model's checkpoint and the port, for the test to restart the service on the same address with it (the
    open page keeps talking to that address)."""
    if os.environ.get("CARVAE_WEB_TEST_URL"):
        pytest.skip("restarts its own service")
    other = another_model(tmp_path)
    port = free_port()
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get_log("browser")
    with running_service(tiny_checkpoint, port=port) as url:
        browser.get(f"{url}/")
        wait_for(browser, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)
        yield other, port


def test_a_service_restarted_with_another_model_asks_for_a_reload(
    browser: Any, tiny_checkpoint: Path, photos: dict[str, Path], tmp_path: Path
) -> None:
    # The service restarted with another checkpoint while the page was open: decodes failed with "body.z[0]
    # has 8 values; this model's latent_dim is 4", and nothing said that the page must be reloaded.
    with page_of_the_tiny_model(browser, tiny_checkpoint, tmp_path) as (other, port):
        assert not [b for b in browser.find_elements("id", "reload-btn") if b.is_displayed()]
    with running_service(other, port=port) as url:
        new_id = model_info(url)["model_id"]
        by_id(browser, "latent-zero").click()  # a decode of 8 values, which the new model refuses
        explore = by_id(browser, "explore-msg")
        wait_for(browser, lambda d: "another model" in explore.text)
        assert new_id in explore.text and "Reload the page" in explore.text
        assert "latent_dim" not in explore.text
        banner = by_id(browser, "global-msg")
        wait_for(browser, lambda d: "another model" in banner.text)
        assert new_id in banner.text and "Reload the page" in banner.text
        assert by_id(browser, "reload-btn").is_displayed()
        screenshot(browser, "model-changed")

        # An answer that succeeds, but from the new model, is not shown as this page's model's.
        upload(browser, "file-input", photos["red"])
        recon = by_id(browser, "reconstruct-msg")
        wait_for(browser, lambda d: "another model" in recon.text)
        assert not by_id(browser, "compare").is_displayed()

        by_id(browser, "reload-btn").click()
        wait_for(browser, lambda d: "z 4" in by_id(d, "model-chip").text)
        wait_for(browser, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)
        assert not by_id(browser, "reload-btn").is_displayed()
        assert by_id(browser, "global-msg").text == ""
    assert not [e["message"] for e in browser.get_log("browser") if e.get("source") == "javascript"]


def test_the_reload_banner_goes_when_the_service_runs_the_pages_model_again(
    browser: Any, tiny_checkpoint: Path, photos: dict[str, Path], tmp_path: Path
) -> None:
    # A service restarted with another model and then rolled back: the banner asking for a reload stayed
    # (and the chip still said "Model changed") although the page's requests worked again.
    with page_of_the_tiny_model(browser, tiny_checkpoint, tmp_path) as (other, port):
        reload_row = by_id(browser, "reload-row")
        chip = by_id(browser, "model-chip").text
    with running_service(other, port=port):
        by_id(browser, "latent-zero").click()
        wait_for(browser, lambda d: by_id(d, "reload-btn").is_displayed())
    with running_service(tiny_checkpoint, port=port):
        by_id(browser, "latent-zero").click()
        wait_for(browser, lambda d: not reload_row.is_displayed())
        assert by_id(browser, "global-msg").text == ""
        assert by_id(browser, "model-chip").text == chip
        wait_for(browser, lambda d: by_id(d, "explore-msg").text == "")
        # And the page works as before: a photo is reconstructed, and the banner does not come back.
        upload(browser, "file-input", photos["red"])
        wait_for(browser, lambda d: "Reconstructed “red-car.png”" in by_id(d, "reconstruct-msg").text)
        assert not reload_row.is_displayed()
    # Restarted with another model once more: the banner is back.
    with running_service(other, port=port):
        by_id(browser, "latent-zero").click()
        wait_for(browser, lambda d: by_id(d, "reload-btn").is_displayed())
        # The banner's text comes a frame after its button (util.js say()).
        wait_for(browser, lambda d: "another model" in by_id(d, "global-msg").text)
    assert not [e["message"] for e in browser.get_log("browser") if e.get("source") == "javascript"]


def test_a_failed_request_does_not_leave_the_previous_result_as_its_answer(
    page: Any, photos: dict[str, Path]
) -> None:
    # A sample grid or a decoded latent image from an earlier request stayed on screen, as it was, beside
    # the new request's error, and read as its answer. A reconstruction and interpolation frames are removed
    # (test_a_failed_interpolation_hides_the_previous_frames); so is a grid now. The explorer keeps its
    # image, dimmed and labelled as the previous result, until a decode succeeds.
    upload(page, "file-input", photos["red"])
    wait_for(page, lambda d: "Reconstructed “red-car.png”" in by_id(d, "reconstruct-msg").text)
    wait_for(page, lambda d: "red-car.png" in by_id(d, "latent-source").text)
    wait_for(page, lambda d: same_picture(src_of(d, "latent-img"), src_of(d, "recon-img")))
    figure = page.find_element("css selector", "#explore figure")
    stale_note = by_id(page, "latent-stale")
    assert not stale_note.is_displayed() and "stale" not in figure.get_attribute("class")
    alt = by_id(page, "latent-img").get_attribute("alt")

    page.execute_script("window.realFetch = window.fetch")
    busy = json.dumps({"error": {"code": "overloaded", "message": "queue full", "request_id": "r7"}})
    for path_end in ("reconstruct", "decode"):
        answer_in_browser(page, path_end, 503, busy, {"Content-Type": "application/json"})
    upload(page, "file-input", photos["blue"])
    wait_for(page, lambda d: "overloaded" in by_id(d, "reconstruct-msg").text)
    assert not by_id(page, "compare").is_displayed() and not by_id(page, "result-bar").is_displayed()

    by_id(page, "sample-btn").click()
    wait_for(page, lambda d: "overloaded" in by_id(d, "sample-msg").text)
    assert page.find_elements("css selector", "#sample-grid img") == []

    shown = src_of(page, "latent-img")
    by_id(page, "latent-zero").click()
    wait_for(page, lambda d: "overloaded" in by_id(d, "explore-msg").text)
    assert stale_note.is_displayed() and "Previous result" in stale_note.text
    assert "stale" in figure.get_attribute("class")
    assert src_of(page, "latent-img") == shown
    assert "Previous result" in by_id(page, "latent-img").get_attribute("alt")
    screenshot(page, "web-previous-result")

    page.execute_script("window.fetch = window.realFetch")  # the service answers again
    by_id(page, "latent-zero").click()
    wait_for(page, lambda d: not stale_note.is_displayed())
    assert not same_picture(src_of(page, "latent-img"), shown)  # z = 0's image, not the red car's
    assert "stale" not in figure.get_attribute("class")
    assert by_id(page, "latent-img").get_attribute("alt") == alt
    by_id(page, "sample-btn").click()
    wait_for(page, lambda d: len(d.find_elements("css selector", "#sample-grid img")) == 16)


def disabled_reason(page: Any, element_id: str) -> tuple[str, str]:
    """(tooltip, what Chromium gives a screen reader as the description) of a control."""
    node = ax_node(page, element_id)
    title = by_id(page, element_id).get_attribute("title") or ""
    return title, str(node.get("description", {}).get("value", ""))


def test_the_interpolate_button_says_which_car_it_waits_for(page: Any, photos: dict[str, Path]) -> None:
    # Disabled until both cars are chosen, it said nothing about why, to a pointer or a screen reader.
    button = by_id(page, "interp-btn")
    assert not button.is_enabled()
    assert disabled_reason(page, "interp-btn") == ("Choose car A and car B first",) * 2
    upload(page, "file-a", photos["red"])
    assert not button.is_enabled()
    assert disabled_reason(page, "interp-btn") == ("Choose car B first",) * 2
    upload(page, "file-b", photos["blue"])
    assert button.is_enabled()
    assert disabled_reason(page, "interp-btn") == ("", "")


def test_the_temperature_readout_matches_a_slider_the_browser_restored(
    chromium: tuple[str, str], base_url: str, tmp_path: Path
) -> None:
    # Back at the page after leaving it, the browser restores the form's last values before any script runs
    # (unless it kept the whole page in its back/forward cache, which it often cannot; switched off here).
    # The readout still said the markup's "1.0" beside a slider at 1.7, over a grid sampled at 1.7.
    from selenium.webdriver.common.keys import Keys

    driver = make_driver(
        *chromium, profile_dir=tmp_path / "profile", extra_flags=("--disable-features=BackForwardCache",)
    )
    try:
        driver.get(f"{base_url}/")
        wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        by_id(driver, "temperature").send_keys(Keys.ARROW_RIGHT * 7)
        assert by_id(driver, "temperature-out").text == "1.7"
        driver.get(f"{base_url}/openapi.json")
        driver.back()
        wait_for(driver, lambda d: "temperature 1.7." in by_id(d, "sample-msg").text)
        assert by_id(driver, "temperature").get_attribute("value") == "1.7"  # as the visitor left it
        assert by_id(driver, "temperature-out").text == "1.7"
        screenshot(driver, "web-temperature-restored")
    finally:
        driver.quit()


def hold_in_browser(page: Any, path_end: str) -> None:
    """Hold the page's fetches of URLs ending in `path_end` until release_in_browser(): a service as slow as
    the test needs, with no timing in it."""
    page.execute_script(
        """
        const end = arguments[0];
        const real = window.fetch;
        window.heldGate = new Promise((r) => { window.releaseHeld = r; });
        window.fetch = (url, opts) =>
          String(url).endsWith(end) ? window.heldGate.then(() => real(url, opts)) : real(url, opts);
        """,
        path_end,
    )


def release_in_browser(page: Any) -> None:
    page.execute_script("window.releaseHeld()")


def test_a_result_being_replaced_is_dimmed_until_the_new_one_comes(
    page: Any, photos: dict[str, Path]
) -> None:
    # While the next photo's reconstruction (or the next grid) was on its way, the previous one stayed at
    # full strength with nothing moving on screen: beside "Reconstructing “blue-car.png”…" it read as that
    # photo's answer, and its download link as that photo's reconstruction.
    def opacity(element_id: str) -> float:
        return float(
            page.execute_script("return getComputedStyle(arguments[0]).opacity", by_id(page, element_id))
        )

    def spinner(section_id: str) -> bool:
        return bool(
            page.execute_script(
                "const s = getComputedStyle(document.querySelector(`#${arguments[0]} h2`), '::after');"
                "return s.content !== 'none' && s.visibility === 'visible'",
                section_id,
            )
        )

    assert opacity("sample-grid") == 1 and not spinner("sample")
    upload(page, "file-input", photos["red"])
    wait_for(page, lambda d: "Reconstructed “red-car.png”" in by_id(d, "reconstruct-msg").text)
    assert opacity("compare") == 1 and opacity("result-bar") == 1 and not spinner("reconstruct")
    hold_in_browser(page, "reconstruct")
    upload(page, "file-input", photos["blue"])
    wait_for(
        page, lambda d: opacity("compare") < 0.5 and opacity("result-bar") < 0.5 and spinner("reconstruct")
    )
    screenshot(page, "web-result-on-its-way")
    release_in_browser(page)
    wait_for(page, lambda d: "Reconstructed “blue-car.png”" in by_id(d, "reconstruct-msg").text)
    assert opacity("compare") == 1 and opacity("result-bar") == 1 and not spinner("reconstruct")

    hold_in_browser(page, "decode")
    by_id(page, "new-seed").click()
    wait_for(page, lambda d: opacity("sample-grid") < 0.5 and spinner("sample"))
    release_in_browser(page)
    wait_for(page, lambda d: "16 cars from seed" in by_id(d, "sample-msg").text)
    assert opacity("sample-grid") == 1 and not spinner("sample")


def test_a_file_the_browser_cannot_read_is_not_blamed_on_the_connection(
    page: Any, photos: dict[str, Path], tmp_path: Path
) -> None:
    # A folder dropped or picked, or a file moved, deleted or changed since it was chosen, cannot be read:
    # fetch failed as if the network had, and the page said the service could not be reached, to check
    # the connection and try again, which failed the same way for ever.
    folder = tmp_path / "holiday-photos"
    folder.mkdir()
    upload(page, "file-input", folder)
    msg = by_id(page, "reconstruct-msg")
    wait_for(page, lambda d: "failed" in msg.text)
    assert msg.text == (
        "Reconstructing “holiday-photos” failed: the file could not be read from this device (it may be a "
        "folder, or a file moved, deleted or changed since it was chosen). Choose it again."
    )

    upload(page, "file-a", folder)
    upload(page, "file-b", photos["red"])
    by_id(page, "interp-btn").click()
    msg = by_id(page, "interp-msg")
    wait_for(page, lambda d: "failed" in msg.text)
    assert msg.text.startswith(
        "Interpolating failed: car A (“holiday-photos”) could not be read from this device"
    )
    screenshot(page, "web-unreadable-file")

    # Picked again as a readable file, it is sent as before.
    upload(page, "file-a", photos["blue"])
    by_id(page, "interp-btn").click()
    wait_for(page, lambda d: "8 frames from “blue-car.png” to “red-car.png”" in msg.text)


def drop_on(page: Any, element_id: str, text: str = "", png: Path | None = None) -> None:
    """Drop onto an element what a drag from elsewhere would bring: some text (a link, a selection) and/or
    a PNG file, through the same drag events as a real drag."""
    page.execute_script(
        """
        const [id, text, name, b64] = arguments;
        const dt = new DataTransfer();
        if (text) dt.setData('text/plain', text);
        if (b64) {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          dt.items.add(new File([bytes], name, {type: 'image/png'}));
        }
        const zone = document.getElementById(id);
        for (const type of ['dragenter', 'dragover', 'drop']) {
          zone.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
        }
        """,
        element_id,
        text,
        png.name if png else "",
        base64.b64encode(png.read_bytes()).decode() if png else "",
    )


def test_dropping_something_that_is_not_a_file_says_so(page: Any, photos: dict[str, Path]) -> None:
    # Text or a link dragged onto a drop target (from another page, say) did nothing at all: no photo, no
    # message, as if the page had not noticed.
    drop_on(page, "dropzone", png=photos["red"])
    msg = by_id(page, "reconstruct-msg")
    wait_for(page, lambda d: "Reconstructed “red-car.png”" in msg.text)
    drop_on(page, "dropzone", text="https://example.com/car.jpg")
    wait_for(
        page,
        lambda d: (
            msg.text
            == "Nothing to reconstruct: what was dropped is not a file (a link or some text, perhaps). "
            "Drop a photo file, or choose one."
        ),
    )
    assert "error" in (msg.get_attribute("class") or "")
    assert by_id(page, "compare").is_displayed()  # nothing was sent: the result shown is still current

    interp_msg = by_id(page, "interp-msg")
    for element_id, car in (("drop-a", "Car A"), ("drop-b", "Car B")):
        drop_on(page, element_id, text="a few words")
        wait_for(
            page, lambda d, car=car: interp_msg.text.startswith(f"{car}: what was dropped is not a file")
        )
    drop_on(page, "drop-a", png=photos["red"])
    drop_on(page, "drop-b", png=photos["blue"])
    assert by_id(page, "name-a").text == "red-car.png" and by_id(page, "name-b").text == "blue-car.png"
    screenshot(page, "web-dropped-not-a-file")


def test_a_larger_default_text_size_scales_the_whole_page(
    chromium: tuple[str, str], base_url: str, photos: dict[str, Path], tmp_path: Path
) -> None:
    # Chromium's "Font size: Very large" (24 px) grew the headings and small print, sized in rem, but not
    # the body text, fixed at 16 px: the hint under "Drop a car photo here" came out larger than that line,
    # and the two-column layout kept its pixel breakpoints, squeezing the explorer's image.
    driver = make_driver(
        *chromium, profile_dir=tmp_path / "profile", prefs={"webkit": {"webprefs": {"default_font_size": 24}}}
    )
    try:
        driver.get(f"{base_url}/")
        wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
        upload(driver, "file-input", photos["red"])
        wait_for(driver, lambda d: "Reconstructed" in by_id(d, "reconstruct-msg").text)

        def font_px(selector: str) -> float:
            return float(
                driver.execute_script(
                    "return parseFloat(getComputedStyle(document.querySelector(arguments[0])).fontSize)",
                    selector,
                )
            )

        assert font_px("body") == 24
        assert font_px(".dz-main") == 24
        assert font_px(".dz-hint") < font_px(".dz-main")
        # 1280 px is 53 lines of 24 px text across: the layout of a narrower screen, one card under the other.
        reconstruct, explore = (by_id(driver, i).rect for i in ("reconstruct", "explore"))
        assert explore["y"] >= reconstruct["y"] + reconstruct["height"]
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        skip = driver.find_element("css selector", ".skip-link").rect
        assert skip["y"] + skip["height"] <= 0  # out of sight until focused, however tall the text makes it
        screenshot(driver, "web-large-text")
    finally:
        driver.quit()
