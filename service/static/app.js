// Boots the page: API-key field, model card, then the four sections, which all need the model's sizes.

import { ApiError, api, describeError, expectModel, getApiKey, isTransient, retryAfterSeconds, setApiKey } from "./js/api.js";
import { createExplorer } from "./js/explorer.js";
import { createInterpolator } from "./js/interpolate.js";
import { renderModelCard } from "./js/modelcard.js";
import { createReconstructor } from "./js/reconstruct.js";
import { createSampler, randomSeed } from "./js/sampler.js";
import { fileDropTarget, notAFile, say } from "./js/util.js";

const $ = (id) => document.getElementById(id);

function setupApiKey(onSaved) {
  const input = $("api-key");
  input.value = getApiKey();
  if (input.value) $("api-key-box").open = true;
  $("api-key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(input.value.trim());
    say($("api-key-msg"), input.value.trim() ? "Key saved for this tab." : "Key cleared.", "ok");
    onSaved();
  });
  $("api-key-clear").addEventListener("click", () => {
    input.value = "";
    setApiKey("");
    say($("api-key-msg"), "Key cleared.", "ok");
  });
}

// The model card is the first call, and the sections wait for it. While the service warms up it answers
// 503; while it (or the network) is down, nothing answers at all. Both pass: keep trying, every second at
// first, then less and less often (up to every 30 s), and start the sections when it answers.
const RETRY_FAST = 3; // tries a second apart before backing off
const RETRY_MAX_S = 30;
let wake = null; // ends the current wait between tries early (a visitor is waiting for an answer)

function waitingMessage(e) {
  if ((e.status === 503 && e.code === "overloaded") || e.status === 429) {
    return "The service is busy right now. This page keeps trying and starts by itself as soon as it answers.";
  }
  if (e.status === 503 && e.code !== "unavailable" && e.code !== "http_503") return "The model is still loading…";
  const what = e.status === 0 ? "cannot be reached" : `is not answering (HTTP ${e.status})`;
  return `The service ${what}. This page keeps trying and starts by itself as soon as it answers: wait here, or reload the page later.`;
}

async function loadModel() {
  let shown = "";
  for (let failures = 1; ; failures++) {
    try {
      return await api("v1/model");
    } catch (e) {
      if (!isTransient(e)) throw e;
      // Once per cause: say() re-announces even the same text, and this would be read out at every try.
      const text = waitingMessage(e);
      if (text !== shown) {
        say($("global-msg"), text, e.status === 0 || e.status === 502 ? "error" : "info");
        $("model-chip").textContent = e.status === 503 ? "Loading the model…" : "Waiting for the service…";
        shown = text;
      }
      const backoff = failures <= RETRY_FAST ? 1 : Math.min(RETRY_MAX_S, 2 ** (failures - RETRY_FAST));
      const seconds = Math.min(RETRY_MAX_S, retryAfterSeconds(e) ?? backoff);
      await new Promise((resolve) => {
        wake = resolve;
        setTimeout(resolve, seconds * 1000);
      });
      wake = null;
    }
  }
}

// Until the sections start, what the visitor does must not vanish: a photo picked or dropped is kept and
// reconstructed once they start, and pressing "Sample" is answered that the cars come then (before, the
// photo did nothing at all, and the empty seed field stopped the form with the browser's "fill out this
// field"). Either also ends the wait for the next try at once.
const early = new AbortController();
let earlyPhoto = null;

function holdEarlyInput() {
  const { signal } = early;
  fileDropTarget(
    $("dropzone"),
    $("file-input"),
    (file) => {
      earlyPhoto = file;
      say(
        $("reconstruct-msg"),
        `“${file.name}” will be reconstructed as soon as the page reaches the service (see the message at the top).`,
      );
      if (wake) wake();
    },
    { signal, onNoFile: () => say($("reconstruct-msg"), notAFile("Nothing to reconstruct"), "error") },
  );
  // A seed now, so that the form (whose seed is required) can be sent and the press answered.
  if (!$("seed").value) $("seed").value = randomSeed();
  $("sample-form").addEventListener(
    "submit",
    (e) => {
      e.preventDefault();
      say($("sample-msg"), "Cars will be sampled as soon as the page reaches the service (see the message at the top).");
      if (wake) wake();
    },
    { signal },
  );
}

// The temperature's readout follows its slider from the start, not from when the sampler starts (it did
// not move while the page still waited for the service), and again at "pageshow": coming back to the page
// (back/forward, without the page kept in memory) Chromium restores the slider's last position just before
// that event, with no "input" event, and the markup's "1.0" stood beside a slider at 1.7 and a grid sampled
// at 1.7.
function showTemperature() {
  $("temperature-out").textContent = Number($("temperature").value).toFixed(1);
}

function startSections(model) {
  early.abort(); // the sections' own handlers take over from here
  const explorer = createExplorer(
    {
      busy: [$("latent-img").closest("figure")],
      img: $("latent-img"),
      figure: $("latent-img").closest("figure"),
      stale: $("latent-stale"),
      source: $("latent-source"),
      sliders: $("sliders"),
      msg: $("explore-msg"),
      reset: $("latent-reset"),
      zero: $("latent-zero"),
    },
    model,
  );
  const reconstructor = createReconstructor(
    {
      busy: [$("compare"), $("result-bar")],
      zone: $("dropzone"),
      input: $("file-input"),
      msg: $("reconstruct-msg"),
      compare: $("compare"),
      resultBar: $("result-bar"),
      original: $("original-img"),
      recon: $("recon-img"),
      psnr: $("psnr"),
      download: $("download"),
    },
    model,
    explorer,
  );
  const sampler = createSampler(
    {
      busy: [$("sample-grid")],
      form: $("sample-form"),
      seed: $("seed"),
      newSeed: $("new-seed"),
      temperature: $("temperature"),
      button: $("sample-btn"),
      msg: $("sample-msg"),
      grid: $("sample-grid"),
      hint: $("sample-hint"),
    },
    model,
    explorer,
  );
  if (earlyPhoto) reconstructor.reconstruct(earlyPhoto);
  // Rank the sliders first, then sample: both hit /decode and the ranking is what the sliders wait on.
  explorer.start().then(() => sampler.sampleIfIdle());
}

function startInterpolator() {
  return createInterpolator({
    busy: [$("player")],
    form: $("interp-form"),
    zoneA: $("drop-a"),
    zoneB: $("drop-b"),
    inputA: $("file-a"),
    inputB: $("file-b"),
    thumb_a: $("thumb-a"),
    thumb_b: $("thumb-b"),
    name_a: $("name-a"),
    name_b: $("name-b"),
    steps: $("steps"),
    button: $("interp-btn"),
    msg: $("interp-msg"),
    player: $("player"),
    stale: $("interp-stale"),
    frame: $("frame-img"),
    play: $("play"),
    slider: $("frame"),
    frameOut: $("frame-out"),
    strip: $("strip"),
  });
}

const chipText = (model) => `${model.model_id} · ${model.image_size} px · z ${model.latent_dim} · ${model.device}`;

// The service was restarted with another model while this page was open: the sections' sizes and slider
// ranking belong to the old one, and only a reload sets them up for the new one.
function modelChanged(modelId) {
  $("model-chip").textContent = `Model changed (now ${modelId}): reload the page`;
  say(
    $("global-msg"),
    `The service now runs another model (“${modelId}”) than the one this page was set up for. Reload the page to use it.`,
    "error",
  );
  $("reload-row").hidden = false;
}

// ...and then with this page's model again (a rollback): its requests work as before, and the banner asking
// for a reload would now be wrong.
function modelRestored(model) {
  $("model-chip").textContent = chipText(model);
  say($("global-msg"), "");
  $("reload-row").hidden = true;
}

let started = false;
let booting = null; // the load of the model card in progress

// Once at a time: saving an API key while the page is still trying only makes it try again now.
function boot() {
  if (booting) {
    if (wake) wake();
    return booting;
  }
  booting = bootOnce().finally(() => (booting = null));
  return booting;
}

async function bootOnce() {
  try {
    const model = await loadModel();
    say($("global-msg"), "");
    $("model-chip").textContent = chipText(model);
    renderModelCard($("model-card"), model);
    document.body.dataset.ready = "true";
    if (!started) {
      started = true;
      expectModel(model.model_id, { changed: modelChanged, restored: () => modelRestored(model) });
      startSections(model);
    }
  } catch (e) {
    $("model-chip").textContent = "Model unavailable";
    $("model-card").textContent = "";
    say($("global-msg"), describeError(e, "Loading the model"), "error");
    if (e instanceof ApiError && (e.status === 401 || e.status === 403)) {
      $("api-key-box").open = true;
      $("api-key").focus();
    }
  }
}

// Dropping a file outside a drop zone would navigate away from the page.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

setupApiKey(() => boot());
showTemperature();
$("temperature").addEventListener("input", showTemperature);
window.addEventListener("pageshow", showTemperature);
$("reload-btn").addEventListener("click", () => window.location.reload());
holdEarlyInput();
startInterpolator(); // it needs nothing from the model card
boot();
