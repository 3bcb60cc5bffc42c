// Renders GET /v1/model as a definition list. The training record is free-form JSON written by the trainer,
// so it is rendered generically (nested objects become nested lists) and always as text, never as HTML.

const MAX_DEPTH = 3;

// The trainer's keys (trainer/train.py training_meta and TrainConfig.signature), as a visitor reads them,
// with the unit a value is in where it has one. Keys not listed fall back to humanize().
const LABELS = {
  complete: ["Run complete"],
  signature: ["Settings"],
  data: ["Data"],
  source: ["Source"],
  files: ["Files found"],
  count: ["Images"],
  skipped: ["Files skipped"],
  skipped_reasons: ["Why skipped"],
  fingerprint: ["Fingerprint"],
  data_fingerprint: ["Data fingerprint"],
  split: ["Train/validation split"],
  val_fraction: ["Validation fraction"],
  train: ["Training images"],
  val: ["Validation images"],
  val_hash: ["Validation set hash"],
  recipe: ["Recipe"],
  beta: ["β (KL weight)"],
  kl_warmup_epochs: ["KL warm-up", "epochs"],
  prior: ["Prior"],
  batch_size: ["Batch size"],
  world_size: ["Processes"],
  augment: ["Augmentation"],
  seed: ["Seed"],
  epochs: ["Epochs"],
  epochs_requested: ["Epochs requested"],
  epochs_done: ["Epochs done"],
  best_epoch: ["Best epoch"],
  best_val: ["Best validation"],
  final_val: ["Final validation"],
  psnr: ["PSNR", "dB"],
  ssim: ["SSIM"],
  loss: ["Loss"],
  recon: ["Reconstruction loss"],
  kl: ["KL"],
  mse: ["MSE"],
  log_sigma: ["Decoder log σ"],
  train_images_per_s: ["Training speed", "images/s"],
  train_seconds: ["Training time", "s"],
  data_seconds: ["Data loading time", "s"],
  max_minutes: ["Time budget", "min"],
  stopped_by_budget: ["Stopped by the time budget"],
  lr_schedule: ["Learning-rate schedule"],
  kind: ["Kind"],
  lr: ["Learning rate"],
  min_lr: ["Minimum learning rate"],
  lr_after: ["Learning rate after the step"],
  step_epoch: ["Step at epoch"],
  decay_fraction: ["Share of the run spent decaying"],
  lr_step_epoch: ["Learning-rate step at epoch"],
  warmup_steps: ["Warm-up steps"],
  planned_epochs: ["Planned epochs"],
  grad_clip: ["Gradient clipping"],
  ema: ["EMA"],
  image_size: ["Image size", "px"],
  latent_dim: ["Latent size"],
  channels: ["Channels per level"],
  blocks_per_level: ["Blocks per level"],
  latent_grid: ["Latent grid"],
  resize_policy: ["Resize policy"],
  // Where the run trained; the card's "Device" above is where this service runs the model now.
  device: ["Training device"],
  torch_version: ["PyTorch version"],
  finished_at: ["Finished at"],
};

// Keys that mean another thing inside one part of the record, by the key of that part: the run's seed,
// the split's (train/data.py Split.describe) and the synthetic data's were all "Seed" on the one card.
const LABELS_IN = {
  split: { seed: ["Split seed"] },
  data: { seed: ["Data seed"] },
};

// For keys a newer trainer (or another tool) writes: whole words that are abbreviations read as such, so
// "val_psnr" reads "Validation PSNR", not "Val psnr".
const WORDS = {
  ...{ lr: "learning rate", val: "validation", kl: "KL", ema: "EMA", psnr: "PSNR", ssim: "SSIM", mse: "MSE" },
  ...{ id: "ID", fid: "FID", lpips: "LPIPS" },
};
const UNIT_SUFFIXES = [[/(^|_)psnr$/, "dB"], [/_(seconds|s)$/, "s"], [/_minutes$/, "min"]];

const isRecord = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
// A table's entry for a key of the record, and not what every object has ("constructor", "toString").
const own = (table, key) => (table && Object.hasOwn(table, key) ? table[key] : undefined);

function humanize(key) {
  const words = String(key)
    .split(/[_\s]+/)
    .filter(Boolean)
    .map((w) => own(WORDS, w.toLowerCase()) || w)
    .join(" ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

/** [label, unit or null] for a key of the record, inside the part of it under `parent` (if any). */
function describeKey(key, parent) {
  const known = own(own(LABELS_IN, parent), key) || own(LABELS, key);
  if (known) return [known[0], known[1] || null];
  const suffix = UNIT_SUFFIXES.find(([re]) => re.test(String(key).toLowerCase()));
  return [humanize(key), suffix ? suffix[1] : null];
}

export function formatValue(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return v.toLocaleString("en");
    return Math.abs(v) >= 1000 ? v.toFixed(0) : String(Number(v.toPrecision(4)));
  }
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (Array.isArray(v)) {
    if (!v.length) return "none"; // e.g. augment: [] (the trainer's default); an empty cell read as missing
    if (v.length <= 8 && v.every((x) => typeof x !== "object" || x === null)) return v.map(formatValue).join(", ");
    return `${v.length} items`;
  }
  const s = String(v);
  return s.length > 96 ? `${s.slice(0, 93)}…` : s;
}

function definitionList(entries, depth = 0, parent = null) {
  const dl = document.createElement("dl");
  for (const [key, value] of entries) {
    const [label, unit] = describeKey(key, parent);
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    if (isRecord(value) && depth < MAX_DEPTH) {
      const inner = Object.entries(value);
      dd.className = "nested";
      if (inner.length) dd.append(definitionList(inner, depth + 1, key));
      else dd.textContent = "–";
    } else {
      dd.textContent = isRecord(value)
        ? JSON.stringify(value).slice(0, 96)
        : withUnit(formatValue(value), value, unit);
    }
    dl.append(dt, dd);
  }
  return dl;
}

function withUnit(text, value, unit) {
  return unit && typeof value === "number" ? `${text} ${unit}` : text;
}

const same = (a, b) => a !== undefined && JSON.stringify(a) === JSON.stringify(b);

/**
 * The record without its repeats: the trainer stores the run's settings twice, once as they are and once
 * in `signature` (what --if-missing compares), so most settings would be listed twice. A setting of the
 * signature is kept (under "Settings") only when the card does not already show that value elsewhere.
 */
function trainingEntries(m) {
  const t = isRecord(m.training) ? m.training : {};
  const sig = isRecord(t.signature) ? t.signature : null;
  const entries = Object.entries(t);
  if (!sig) return entries;
  const pick = (o, k) => (o && typeof o === "object" ? o[k] : undefined);
  const shownAs = {
    data_fingerprint: pick(t.data, "fingerprint"),
    epochs: t.epochs_requested,
    val_fraction: pick(t.split, "val_fraction"),
    lr: pick(t.lr_schedule, "lr"),
    lr_schedule: pick(t.lr_schedule, "kind"),
    warmup_steps: pick(t.lr_schedule, "warmup_steps"),
    lr_step_epoch: pick(t.lr_schedule, "step_epoch"),
    image_size: m.image_size,
    latent_dim: m.latent_dim,
    resize_policy: pick(m.preprocess, "resize"),
  };
  const rest = Object.entries(sig).filter(([k, v]) => !same(k in shownAs ? shownAs[k] : t[k], v));
  return rest.length
    ? entries.map(([k, v]) => [k, k === "signature" ? Object.fromEntries(rest) : v])
    : entries.filter(([k]) => k !== "signature");
}

function section(title, node) {
  const wrap = document.createElement("div");
  wrap.className = "card-part";
  const h = document.createElement("h3");
  h.textContent = title;
  wrap.append(h, node);
  return wrap;
}

export function renderModelCard(container, m) {
  const pre = m.preprocess || {};
  const summary = [
    ["Model", m.model_id],
    ["Architecture", m.architecture],
    ["Image size", `${m.image_size} × ${m.image_size} px, RGB`],
    ["Latent size", `${m.latent_dim} dimensions`],
    ["Parameters", typeof m.parameters === "number" ? `${(m.parameters / 1e6).toFixed(2)} M` : m.parameters],
    ["Device", m.device],
    ["Preprocessing", [pre.resize, pre.resample].filter(Boolean).join(", ") || "–"],
    ["Package version", m.package_version],
    ["Content hash", m.content_hash ? `${String(m.content_hash).slice(0, 16)}…` : "–"],
  ];
  const training = trainingEntries(m);
  container.textContent = "";
  container.append(section("Model", definitionList(summary)));
  container.append(
    section(
      "Training data and metrics",
      training.length ? definitionList(training) : Object.assign(document.createElement("p"), {
        className: "help",
        textContent: "This checkpoint records no training information.",
      }),
    ),
  );
}
