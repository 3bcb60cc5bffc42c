// Small helpers shared by the page's sections: status messages, a seeded Gaussian generator,
// and reading pixels back from base64 images.

const pendingText = new WeakMap(); // element -> its animation-frame id, while a message waits to be shown

/** Show a message in a section's aria-live region; kind is "info", "ok" or "error". */
export function say(el, text, kind = "info") {
  // A message still waiting for its frame must not land after a newer one (or after a clear, which
  // is immediate) and then stay.
  cancelAnimationFrame(pendingText.get(el));
  pendingText.delete(el);
  el.classList.remove("info", "ok", "error");
  if (!text) {
    el.textContent = "";
    return;
  }
  el.classList.add(kind);
  // Clearing first makes screen readers announce a repeated identical message again.
  el.textContent = "";
  pendingText.set(
    el,
    requestAnimationFrame(() => {
      pendingText.delete(el);
      el.textContent = text;
    }),
  );
}

/**
 * Mark a section's result area as being updated (aria-busy), or no longer. Only the result area: a screen
 * reader that honours aria-busy holds back every change inside it, so on the section it also silenced
 * the section's own progress message ("Reconstructing…") while the request ran.
 */
export function setBusy(nodes, on) {
  for (const node of nodes) {
    if (on) node.setAttribute("aria-busy", "true");
    else node.removeAttribute("aria-busy");
  }
}

/**
 * Enable a button, or disable it saying why: a disabled button gave no reason of its own, to a pointer
 * hovering it or to a screen reader (which reads the title as its description). For buttons without a
 * title of their own; an enabled one has none.
 */
export function allowButton(button, reason = "") {
  button.disabled = Boolean(reason);
  if (reason) button.title = reason;
  else button.removeAttribute("title");
}

/**
 * A section's requests, of which only the newest counts: `next()` cancels the one still in flight (its
 * fetch aborts) and returns the new one's `signal` and `current()`, false once a newer one has started, so
 * a slow answer never overwrites a newer one. `started()`: whether there has been any.
 */
export function newestRequest() {
  let count = 0;
  let controller = null;
  return {
    next() {
      if (controller) controller.abort();
      controller = new AbortController();
      const mine = ++count;
      return { signal: controller.signal, current: () => mine === count };
    },
    started: () => count > 0,
  };
}

/** data: URL for a base64 image from the API; `format` is the API's format name (png, jpeg, webp). */
export function dataUrl(b64, format = "png") {
  return `data:image/${format};base64,${b64}`;
}

// mulberry32: a tiny, well-mixed 32-bit generator. Being defined here (not Math.random) is what makes a seed
// give the same latent codes in every browser.
function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** rows × cols matrix of N(0, temperature²) draws from `seed` (Box–Muller). */
export function gaussianRows(seed, rows, cols, temperature = 1) {
  const next = mulberry32(seed);
  const out = [];
  for (let r = 0; r < rows; r++) {
    const row = new Array(cols);
    for (let c = 0; c < cols; c += 2) {
      const u1 = 1 - next(); // (0, 1]: log(0) would be -Infinity
      const u2 = next();
      const radius = Math.sqrt(-2 * Math.log(u1));
      row[c] = radius * Math.cos(2 * Math.PI * u2) * temperature;
      if (c + 1 < cols) row[c + 1] = radius * Math.sin(2 * Math.PI * u2) * temperature;
    }
    out.push(row);
  }
  return out;
}

/** RGBA pixels of an image URL, drawn at its natural size. */
export async function pixelsOf(url) {
  const img = new Image();
  img.src = url;
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, canvas.width, canvas.height).data;
}

/** Mean absolute difference per RGB channel value (0..255) between two same-sized RGBA buffers. */
export function meanAbsDiff(a, b) {
  let sum = 0;
  let n = 0;
  for (let i = 0; i < a.length; i += 4) {
    sum += Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]) + Math.abs(a[i + 2] - b[i + 2]);
    n += 3;
  }
  return n ? sum / n : 0;
}

/** A picked or dropped file that the browser could not read; its message is a sentence for the visitor. */
export class UnreadableFile extends Error {
  constructor(what) {
    super(
      `${what} could not be read from this device (it may be a folder, or a file moved, deleted or changed ` +
        "since it was chosen). Choose it again.",
    );
    this.name = "UnreadableFile";
  }
}

/**
 * A picked or dropped file's bytes, read now, as a File to upload. Left to fetch, a file that cannot be
 * read failed the upload like a lost connection, and the page told the visitor that the service could not
 * be reached. `what` names the file in the error (UnreadableFile).
 */
export async function readFile(file, what) {
  try {
    return new File([await file.arrayBuffer()], file.name, { type: file.type });
  } catch {
    throw new UnreadableFile(what);
  }
}

/** What to tell a visitor who dropped something that is not a file; `what` starts the sentence. */
export function notAFile(what) {
  return `${what}: what was dropped is not a file (a link or some text, perhaps). Drop a photo file, or choose one.`;
}

/**
 * Wire a label-wrapped file input as a drop target; `onFile` gets the first dropped or picked file, and
 * `onNoFile` is called for a drop that holds no file (dragged text or a link), which did nothing at all.
 * `signal` (an AbortSignal) removes the listeners again.
 */
export function fileDropTarget(zone, input, onFile, { signal, onNoFile } = {}) {
  const opts = signal ? { signal } : undefined;
  input.addEventListener(
    "change",
    () => {
      if (input.files && input.files[0]) onFile(input.files[0]);
      input.value = ""; // so picking the same file again fires "change" again
    },
    opts,
  );
  zone.addEventListener(
    "dragover",
    (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    },
    opts,
  );
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"), opts);
  zone.addEventListener(
    "drop",
    (e) => {
      e.preventDefault();
      zone.classList.remove("dragging");
      const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
      if (file) onFile(file);
      else if (onNoFile) onNoFile();
    },
    opts,
  );
}
