// Two photos → POST /interpolate → a player: the current frame large, every frame in a strip, a play/pause
// button and a frame slider. Playback bounces A → B → A.

import { ApiError, api, describeError } from "./api.js";
import { allowButton, dataUrl, fileDropTarget, newestRequest, notAFile, readFile, say, setBusy } from "./util.js";

const FRAME_MS = 140;

export function createInterpolator(els) {
  const files = { a: null, b: null };
  let frames = [];
  let current = 0;
  let direction = 1;
  let timer = null;
  let pair = null; // the files the frames shown were made from
  const requests = newestRequest();
  const stripLabel = els.strip.getAttribute("aria-label");

  // Once car A or B is changed, the frames shown are of the previous pair: stopped, dimmed and labelled
  // so (to a screen reader by their text alternatives) until the visitor interpolates again, as the
  // explorer does with an image it could not replace. Not removed: nothing failed, and they stay to compare.
  // Their controls are disabled meanwhile, saying why: Play (or the slider, or a frame of the strip) set the
  // previous pair moving again as if it were the answer.
  // The same photo chosen again is a new File object: compared as such, its own frames read as the
  // "previous pair" of a pair named exactly as the one chosen now.
  const sameFile = (x, y) =>
    x === y ||
    (x !== null && y !== null && x.name === y.name && x.size === y.size && x.lastModified === y.lastModified);
  const isStale = () => pair !== null && !(sameFile(pair.a, files.a) && sameFile(pair.b, files.b));
  function markStale() {
    const stale = isStale();
    els.player.classList.toggle("stale", stale);
    els.stale.hidden = !stale;
    if (stale) {
      setPlaying(false);
      const names = `“${pair.a.name}” and “${pair.b.name}”`;
      els.stale.textContent = `Frames of the previous pair, ${names}: press Interpolate for the cars chosen now.`;
    }
    const controls = [els.play, els.slider, ...els.strip.querySelectorAll("button")];
    // A control disabled with the keyboard focus on it drops the focus to the page's start (a car dropped
    // with the mouse leaves it where it was); it goes on to what the note says to press instead.
    if (stale && controls.includes(document.activeElement)) els.button.focus();
    const reason = stale ? "These are the previous pair's frames: press Interpolate for the cars chosen now" : "";
    for (const control of controls) allowButton(control, reason);
    const label = stale ? `Frames of the previous pair, ${pair.a.name} to ${pair.b.name}` : stripLabel;
    els.strip.setAttribute("aria-label", label);
    if (frames.length) show(current);
  }

  function pick(which, file) {
    files[which] = file;
    const thumb = els[`thumb_${which}`];
    if (thumb.dataset.url) URL.revokeObjectURL(thumb.dataset.url);
    thumb.dataset.url = URL.createObjectURL(file);
    thumb.src = thumb.dataset.url;
    thumb.alt = `Car ${which.toUpperCase()}: ${file.name}`;
    // Shown once it loads (see below): the browser cannot draw every file the service reads (TIFF) nor,
    // of course, a file that is no image, and a broken-image icon with a clipped alt text helps no one.
    els[`name_${which}`].textContent = file.name;
    allowButton(els.button, missingReason());
    markStale();
  }

  function missingReason() {
    const missing = ["a", "b"].filter((which) => !files[which]).map((which) => `car ${which.toUpperCase()}`);
    return missing.length ? `Choose ${missing.join(" and ")} first` : "";
  }

  function show(i) {
    current = i;
    els.frame.src = frames[i];
    const of = `${i + 1} of ${frames.length}`;
    els.frame.alt = isStale()
      ? `Previous pair's frame ${of}, between “${pair.a.name}” and “${pair.b.name}”, not the cars chosen now`
      : `Frame ${of}, between car A and car B`;
    els.slider.value = String(i);
    els.slider.setAttribute("aria-valuetext", `Frame ${i + 1} of ${frames.length}`); // its value is 0-based
    els.frameOut.textContent = `${i + 1} of ${frames.length}`;
    els.strip.querySelectorAll("button").forEach((b, j) => b.setAttribute("aria-current", j === i ? "true" : "false"));
  }

  function setPlaying(on) {
    clearInterval(timer);
    timer = null;
    // The label itself says what pressing does (so no aria-pressed, which would contradict it).
    els.play.dataset.playing = String(on);
    els.play.textContent = on ? "Pause" : "Play";
    if (!on || frames.length < 2) return;
    timer = setInterval(() => {
      if (current + direction < 0 || current + direction >= frames.length) direction = -direction;
      show(current + direction);
    }, FRAME_MS);
  }

  function render(images, format, madeFrom) {
    pair = madeFrom;
    frames = images.map((b64) => dataUrl(b64, format));
    els.slider.max = String(frames.length - 1);
    els.strip.textContent = "";
    frames.forEach((url, i) => {
      const item = document.createElement("div");
      item.setAttribute("role", "listitem");
      const b = document.createElement("button");
      b.type = "button";
      b.className = "frame-thumb";
      const img = document.createElement("img");
      img.src = url;
      img.alt = `Frame ${i + 1}`;
      b.append(img);
      b.addEventListener("click", () => {
        setPlaying(false);
        show(i);
      });
      item.append(b);
      els.strip.append(item);
    });
    els.player.hidden = false;
    direction = 1;
    show(0);
    // Motion only when the visitor has not asked the system for less of it.
    setPlaying(!window.matchMedia("(prefers-reduced-motion: reduce)").matches);
    // The visitor may have picked another car while these were on their way.
    markStale();
  }

  async function interpolate() {
    // The button stays enabled while frames are on their way (disabling it moved the keyboard focus off it,
    // to the page itself); a new press supersedes the request in flight, which is cancelled.
    const { signal, current } = requests.next();
    // The files as sent: the visitor may pick others while these are interpolated.
    const [a, b] = [files.a, files.b];
    const steps = els.steps.value;
    say(els.msg, "Interpolating…");
    setBusy(els.busy, true);
    try {
      const form = new FormData();
      form.append("file_a", await readFile(a, `car A (“${a.name}”)`), a.name);
      form.append("file_b", await readFile(b, `car B (“${b.name}”)`), b.name);
      form.append("steps", steps);
      if (!current()) return;
      const res = await api("interpolate", { method: "POST", form, signal });
      if (!current()) return;
      render(res.images, res.format, { a, b });
      say(els.msg, `${res.images.length} frames from “${a.name}” to “${b.name}”.`, "ok");
    } catch (e) {
      if (!current()) return;
      // Stop and hide the previous frames: still playing, they would read as the answer for these files.
      setPlaying(false);
      els.player.hidden = true;
      // A body too large is both files; a file it cannot use the service names by its form field
      // ("file_b: the file is not an image …"), which the visitor knows as car A or car B.
      const upload = { one: "car A or car B", all: `car A (“${a.name}”) and car B (“${b.name}”) together` };
      const field = e instanceof ApiError ? /^file_([ab]):\s*/.exec(e.message) : null;
      let culprit = null;
      if (field) {
        culprit = `car ${field[1].toUpperCase()} (“${(field[1] === "a" ? a : b).name}”)`;
        e.message = e.message.slice(field[0].length);
      }
      say(els.msg, describeError(e, "Interpolating", { upload, culprit }), "error");
    } finally {
      if (current()) setBusy(els.busy, false);
    }
  }

  allowButton(els.button, missingReason()); // the page disables it; this says why
  for (const thumb of [els.thumb_a, els.thumb_b]) {
    thumb.addEventListener("load", () => (thumb.hidden = false));
    thumb.addEventListener("error", () => (thumb.hidden = true));
  }
  fileDropTarget(els.zoneA, els.inputA, (f) => pick("a", f), {
    onNoFile: () => say(els.msg, notAFile("Car A"), "error"),
  });
  fileDropTarget(els.zoneB, els.inputB, (f) => pick("b", f), {
    onNoFile: () => say(els.msg, notAFile("Car B"), "error"),
  });
  els.form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (files.a && files.b) interpolate();
  });
  els.play.addEventListener("click", () => setPlaying(timer === null));
  els.slider.addEventListener("input", () => {
    setPlaying(false);
    show(Number(els.slider.value));
  });
  return { interpolate };
}
