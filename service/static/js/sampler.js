// Samples from the prior. The latent codes are drawn here with a seeded generator and decoded by
// POST /decode, so the page knows each car's exact code: clicking a car loads that code into the explorer.

import { api, describeError } from "./api.js";
import { dataUrl, gaussianRows, newestRequest, say, setBusy } from "./util.js";

const COUNT = 16;
const MAX_SEED = 4294967295;

/** A random seed for the seed field (the first one is set before the model card is in, see app.js). */
export function randomSeed() {
  return String(Math.floor(Math.random() * MAX_SEED));
}

export function createSampler(els, model, explorer) {
  const requests = newestRequest();

  function newSeed() {
    els.seed.value = randomSeed();
  }

  function readSeed() {
    const seed = Number(els.seed.value);
    if (els.seed.value.trim() === "" || !Number.isInteger(seed) || seed < 0 || seed > MAX_SEED) {
      throw new Error(`the seed must be a whole number from 0 to ${MAX_SEED}`);
    }
    return seed;
  }

  function render(images, format, rows, seed, temperature) {
    els.grid.textContent = "";
    images.forEach((b64, i) => {
      const item = document.createElement("div");
      item.setAttribute("role", "listitem");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "sample";
      button.setAttribute("aria-pressed", "false");
      const img = document.createElement("img");
      img.src = dataUrl(b64, format);
      img.alt = `Sampled car ${i + 1} of ${images.length}`;
      img.width = 96;
      img.height = 96;
      button.append(img);
      button.title = "Load this car's latent code into the sliders";
      // One tab stop for the whole grid (see below); the first car is it until another is focused.
      button.tabIndex = i === 0 ? 0 : -1;
      button.setAttribute("aria-describedby", els.hint.id);
      button.addEventListener("click", () => {
        explorer.load(rows[i], `Sample ${i + 1} (seed ${seed}, temperature ${temperature})`); // un-presses the others
        button.setAttribute("aria-pressed", "true");
        say(els.msg, `Loaded sample ${i + 1} into the latent sliders.`, "ok");
      });
      item.append(button);
      els.grid.append(item);
    });
  }

  // The grid of an earlier seed goes with a failure: beside "Sampling failed", it read as this seed's cars.
  function fail(text) {
    els.grid.textContent = "";
    say(els.msg, text, "error");
  }

  async function sample() {
    let seed;
    try {
      seed = readSeed();
    } catch (e) {
      fail(`Sampling failed: ${e.message}.`);
      return;
    }
    // The button stays enabled while a grid is on its way: disabling it moved the keyboard focus off it,
    // to the page itself. A new press supersedes the request in flight instead, which is cancelled.
    const { signal, current } = requests.next();
    const temperature = Number(els.temperature.value);
    const rows = gaussianRows(seed, COUNT, model.latent_dim, temperature);
    say(els.msg, `Sampling ${COUNT} cars with seed ${seed}…`);
    setBusy(els.busy, true);
    try {
      const res = await api("decode", { method: "POST", json: { z: rows }, signal });
      if (!current()) return;
      render(res.images, res.format, rows, seed, temperature.toFixed(1));
      say(els.msg, `${COUNT} cars from seed ${seed}, temperature ${temperature.toFixed(1)}. Select one to explore its latent code.`, "ok");
    } catch (e) {
      if (current()) fail(describeError(e, "Sampling"));
    } finally {
      if (current()) setBusy(els.busy, false);
    }
  }

  // The grid is one tab stop, not 16: Tab reaches the car focused last (the first, in a new grid) and
  // leaves the grid; the arrow keys move between cars, Up and Down by a row as the grid is laid out now
  // (4 or 8 columns), Home and End to the first and last.
  els.grid.addEventListener("focusin", (e) => {
    if (!(e.target instanceof HTMLButtonElement)) return;
    for (const b of els.grid.querySelectorAll("button")) b.tabIndex = b === e.target ? 0 : -1;
  });
  els.grid.addEventListener("keydown", (e) => {
    if (e.altKey || e.ctrlKey || e.metaKey || e.shiftKey) return;
    const buttons = [...els.grid.querySelectorAll("button")];
    const i = buttons.indexOf(e.target);
    if (i < 0) return;
    const top = Math.round(buttons[0].getBoundingClientRect().top);
    const columns = buttons.filter((b) => Math.round(b.getBoundingClientRect().top) === top).length || 1;
    const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -columns, ArrowDown: columns };
    let next;
    if (e.key in moves) next = i + moves[e.key];
    else if (e.key === "Home") next = 0;
    else if (e.key === "End") next = buttons.length - 1;
    else return;
    e.preventDefault(); // the arrows would scroll the page
    if (next >= 0 && next < buttons.length) buttons[next].focus();
  });

  els.form.addEventListener("submit", (e) => {
    e.preventDefault();
    sample();
  });
  els.newSeed.addEventListener("click", () => {
    newSeed();
    sample();
  });

  // "Pressed" means "this car's code is in the explorer": once anything is loaded there, no longer.
  const unpress = () => {
    for (const b of els.grid.querySelectorAll("button[aria-pressed=true]")) b.setAttribute("aria-pressed", "false");
  };
  explorer.onLoad(unpress);

  if (!els.seed.value) newSeed();
  // The first grid is drawn for the visitor, unless they have already asked for one themselves.
  const sampleIfIdle = () => (requests.started() ? undefined : sample());
  return { sample, sampleIfIdle };
}
