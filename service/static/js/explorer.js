// The latent explorer: one slider per latent dimension that matters, re-decoding through POST /decode as
// the user moves them. Dimensions are ranked once per model by how much a step along each one changes the
// decoded image around z = 0 (the prior's mean).

import { api, describeError, isTransient, retryAfterSeconds } from "./api.js";
import { allowButton, dataUrl, meanAbsDiff, pixelsOf, say, setBusy } from "./util.js";

const SLIDERS = 12; // how many dimensions get a slider
const PROBE = 2; // the step (in prior standard deviations) used to rank dimensions
const RANGE = 3; // sliders span ±RANGE
const MAX_ROWS = 64; // the API's limit on rows per /decode call
const RANK_TRIES = 5; // a busy or briefly unreachable service is asked again, 1 + 2 + 4 + 8 s apart at most

function el(tag, props = {}) {
  return Object.assign(document.createElement(tag), props);
}

export function createExplorer(els, model) {
  const dim = model.latent_dim;
  let base = new Array(dim).fill(0); // what "Reset" returns to
  let z = base.slice();
  let order = []; // [{dim, effect}] most effective first
  let seq = 0; // only the newest decode may update the image
  // Said once the ranking has failed for good, and kept: a decode that succeeds clears only its own error.
  let unranked = "";
  let decodeFailed = false;

  // After a failed decode the image is that of an earlier code, not of the sliders. It stays, as the
  // nearest thing to what was asked and a place to go on from, but dimmed and labelled as the previous
  // result (to a screen reader too, by its text alternative) until a decode succeeds.
  const currentAlt = els.img.alt;
  function markStale(on) {
    const stale = on && els.img.hasAttribute("src"); // nothing decoded yet: no earlier image to mark
    els.figure.classList.toggle("stale", stale);
    els.stale.hidden = !stale;
    els.img.alt = stale ? "Previous result, not the current latent code" : currentAlt;
  }

  async function decode() {
    const mine = ++seq;
    setBusy(els.busy, true);
    try {
      const res = await api("decode", { method: "POST", json: { z: [z] } });
      if (mine !== seq) return; // a newer request is on its way
      els.img.src = dataUrl(res.images[0], res.format);
      markStale(false);
      if (decodeFailed) say(els.msg, unranked, "error");
      decodeFailed = false;
    } catch (e) {
      if (mine !== seq) return;
      decodeFailed = true;
      markStale(true);
      say(els.msg, describeError(e, "Decoding the latent code"), "error");
    } finally {
      if (mine === seq) setBusy(els.busy, false);
    }
  }

  // While a slider is dragged: one request at a time, and when it is back, one for wherever the slider is
  // now. The image follows the drag at the service's pace; a debounce showed nothing until the hand
  // stopped, and a request per input event would queue up behind each other.
  let inFlight = false;
  let again = false;
  async function decodeLive() {
    if (inFlight) {
      again = true;
      return;
    }
    inFlight = true;
    try {
      await decode();
    } finally {
      inFlight = false;
      if (again) {
        again = false;
        decodeLive();
      }
    }
  }

  function syncSliders() {
    for (const input of els.sliders.querySelectorAll("input[type=range]")) {
      const d = Number(input.dataset.dim);
      input.value = String(z[d]);
      input.parentElement.querySelector("output").textContent = z[d].toFixed(2);
    }
  }

  function renderSliders() {
    els.sliders.textContent = "";
    const top = order.slice(0, Math.min(SLIDERS, dim));
    const strongest = top.length ? top[0].effect || 1 : 1;
    top.forEach(({ dim: d, effect }, rank) => {
      // Built with DOM calls, no markup strings: works under a strict Content-Security-Policy.
      const row = el("div", { className: "slider" });
      const input = el("input", { id: `z-${d}`, type: "range", min: -RANGE, max: RANGE, step: 0.05 });
      input.dataset.dim = String(d);
      input.setAttribute("aria-describedby", "explore-help");
      const label = el("label", { htmlFor: input.id, textContent: `Dimension ${d}` });
      const output = el("output", { textContent: "0.00" });
      output.htmlFor = input.id;
      // An <output> is a live region (role status) by default: loading a code changes all of them at once,
      // and the slider already speaks its own value.
      output.setAttribute("aria-live", "off");
      const bar = el("span", { className: "effect" });
      bar.title = `Rank ${rank + 1}: mean pixel change ${effect.toFixed(1)} / 255 for a step of ${PROBE}`;
      const fill = el("span");
      fill.style.width = `${Math.max(4, (100 * effect) / strongest).toFixed(0)}%`;
      bar.append(fill);
      row.append(label, output, input, bar);
      input.addEventListener("input", () => {
        z[d] = Number(input.value);
        output.textContent = z[d].toFixed(2);
        decodeLive();
      });
      els.sliders.append(row);
    });
    syncSliders();
  }

  // The ranking is a fixed function of the weights but costs latent_dim + 1 decodes (about 1 MB of PNGs
  // for a 128-dim model, most of the page's weight), so a reload in the same tab reuses it. Keyed by the
  // weights' hash; sessionStorage because the page keeps nothing beyond the tab.
  const rankKey = model.content_hash ? `carvae.rank.${model.content_hash}` : null;

  function savedOrder() {
    try {
      const saved = rankKey && JSON.parse(sessionStorage.getItem(rankKey) || "null");
      const valid = (o) => o && Number.isInteger(o.dim) && o.dim >= 0 && o.dim < dim && Number.isFinite(o.effect);
      return Array.isArray(saved) && saved.length === dim && saved.every(valid) ? saved : null;
    } catch {
      return null; // storage disabled or unreadable: rank again
    }
  }

  function saveOrder() {
    try {
      if (rankKey) sessionStorage.setItem(rankKey, JSON.stringify(order));
    } catch {
      /* storage disabled or full: the next load ranks again */
    }
  }

  // The ranking is asked for right after the model card, when a service under load may well answer 503 (or
  // a proxy 502/504, a rate limiter 429): given up at once, the sliders stayed unranked for good.
  async function decodeForRanking(rows) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await api("decode", { method: "POST", json: { z: rows } });
      } catch (e) {
        if (!isTransient(e) || attempt >= RANK_TRIES) throw e;
        const seconds = Math.min(8, retryAfterSeconds(e) ?? 2 ** (attempt - 1));
        await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
      }
    }
  }

  // One probe row per dimension (z = PROBE·e_d) plus z = 0, decoded in as few calls as the row limit allows.
  async function rank() {
    const saved = savedOrder();
    if (saved) {
      order = saved;
      renderSliders();
      return;
    }
    say(els.msg, "Finding the dimensions that matter most…");
    const rows = [new Array(dim).fill(0)];
    for (let d = 0; d < dim; d++) {
      const row = new Array(dim).fill(0);
      row[d] = PROBE;
      rows.push(row);
    }
    const images = [];
    for (let i = 0; i < rows.length; i += MAX_ROWS) {
      const res = await decodeForRanking(rows.slice(i, i + MAX_ROWS));
      images.push(...res.images.map((b64) => dataUrl(b64, res.format)));
    }
    const pixels = await Promise.all(images.map(pixelsOf));
    order = pixels
      .slice(1)
      .map((p, d) => ({ dim: d, effect: meanAbsDiff(pixels[0], p) }))
      .sort((a, b) => b.effect - a.effect);
    saveOrder();
    renderSliders();
    say(els.msg, "");
  }

  // Codes loaded so far. A section whose answer is slow (an upload) passes the count from when it asked,
  // so its code does not replace one the visitor loaded meanwhile (a sample, z = 0).
  let loads = 0;
  const onLoad = []; // called after each load (the sample grid un-presses its button)

  function load(latent, label, since = loads) {
    if (since !== loads) return false;
    loads++;
    for (const fn of onLoad) fn();
    base = latent.map(Number);
    z = base.slice();
    els.source.textContent = label;
    syncSliders();
    decode();
    return true;
  }

  els.reset.addEventListener("click", () => {
    z = base.slice();
    syncSliders();
    decode();
  });
  els.zero.addEventListener("click", () => load(new Array(dim).fill(0), "The prior's mean, z = 0"));
  // Disabled in the page until now (saying why): before the model card, there was no latent code to reset
  // or zero.
  allowButton(els.reset);
  allowButton(els.zero);

  return {
    async start() {
      try {
        await rank();
      } catch (e) {
        // Still usable without the ranking: show the first dimensions in their natural order, and say so
        // for as long as it lasts (the help text above promises an order).
        order = Array.from({ length: dim }, (_, d) => ({ dim: d, effect: 0 }));
        renderSliders();
        const why = describeError(e, "Ranking the latent dimensions").split("\n");
        const first = Math.min(SLIDERS, dim);
        const what = `The sliders below are the first ${first} dimensions, unranked: reload the page to rank them.`;
        unranked = [why[0], what, ...why.slice(1)].join("\n");
        say(els.msg, unranked, "error");
      }
      decode();
    },
    load,
    loads: () => loads,
    onLoad: (fn) => onLoad.push(fn),
  };
}
