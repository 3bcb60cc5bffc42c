// Renders GET /v1/model as a definition list. The training record is free-form JSON written by the trainer,
// so it is rendered generically (nested objects become nested lists) and always as text, never as HTML.

const MAX_DEPTH = 3;

function humanize(key) {
  const words = String(key).replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
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

function definitionList(entries, depth = 0) {
  const dl = document.createElement("dl");
  for (const [key, value] of entries) {
    const dt = document.createElement("dt");
    dt.textContent = humanize(key);
    const dd = document.createElement("dd");
    if (value && typeof value === "object" && !Array.isArray(value) && depth < MAX_DEPTH) {
      const inner = Object.entries(value);
      dd.className = "nested";
      if (inner.length) dd.append(definitionList(inner, depth + 1));
      else dd.textContent = "–";
    } else {
      dd.textContent = typeof value === "object" && value !== null && !Array.isArray(value)
        ? JSON.stringify(value).slice(0, 96)
        : formatValue(value);
    }
    dl.append(dt, dd);
  }
  return dl;
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
  const training = m.training && typeof m.training === "object" ? Object.entries(m.training) : [];
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
