// Boots the page: API-key field, model card, then the four sections, which all need the model's sizes.

import { ApiError, api, describeError, getApiKey, setApiKey } from "./js/api.js";
import { createExplorer } from "./js/explorer.js";
import { createInterpolator } from "./js/interpolate.js";
import { renderModelCard } from "./js/modelcard.js";
import { createReconstructor } from "./js/reconstruct.js";
import { createSampler } from "./js/sampler.js";
import { say } from "./js/util.js";

const $ = (id) => document.getElementById(id);
const WARMUP_RETRIES = 20;

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

// The model card is the first call; while the service is still warming up it answers 503, so wait a little.
async function loadModel() {
  for (let attempt = 0; ; attempt++) {
    try {
      return await api("v1/model");
    } catch (e) {
      const warming = e instanceof ApiError && e.status === 503 && attempt < WARMUP_RETRIES;
      if (!warming) throw e;
      // Once: say() re-announces even the same text, and this would then be read out every second.
      if (attempt === 0) say($("global-msg"), "The model is still loading…");
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
}

function startSections(model) {
  const explorer = createExplorer(
    {
      busy: [$("latent-img").closest("figure")],
      img: $("latent-img"),
      source: $("latent-source"),
      sliders: $("sliders"),
      msg: $("explore-msg"),
      reset: $("latent-reset"),
      zero: $("latent-zero"),
    },
    model,
  );
  createReconstructor(
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
      tempOut: $("temperature-out"),
      button: $("sample-btn"),
      msg: $("sample-msg"),
      grid: $("sample-grid"),
    },
    model,
    explorer,
  );
  createInterpolator({
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
    frame: $("frame-img"),
    play: $("play"),
    slider: $("frame"),
    frameOut: $("frame-out"),
    strip: $("strip"),
  });
  // Rank the sliders first, then sample: both hit /decode and the ranking is what the sliders wait on.
  explorer.start().then(() => sampler.sampleIfIdle());
}

let started = false;

async function boot() {
  try {
    const model = await loadModel();
    say($("global-msg"), "");
    $("model-chip").textContent = `${model.model_id} · ${model.image_size} px · z ${model.latent_dim} · ${model.device}`;
    renderModelCard($("model-card"), model);
    document.body.dataset.ready = "true";
    if (!started) {
      started = true;
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
boot();
