// The one place the page talks HTTP: adds the optional API key, asks for JSON, and turns every failure
// (HTTP error, network error, unreadable body) into an ApiError with a message a person can read.

const KEY_STORAGE = "carvae.apiKey";

export function getApiKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled (privacy mode): the page still works without a key
  }
}

export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: nothing to persist */
  }
}

// The model this page was set up for (its latent size, its slider ranking), once its card is in. A service
// restarted with another checkpoint meanwhile answers the page's requests for a model it no longer runs:
// a decode then failed with "body.z[0] has 2 values; this model's latent_dim is 128", which told the
// visitor nothing about reloading. Every model answer names its model (model_id), and an answer that
// rejects the input is checked against a fresh model card.
let pageModel = null;
let onModelChange = null;
let onModelBack = null;
let servedElsewhere = null; // the other model the service was last seen running, while it runs one
const RECHECK = [400, 404, 422]; // answers that may mean "not what this model takes"

/** From now on, answers from any other model than `modelId` fail as `model_changed`. `changed(newId)` is
 * called when the service is first seen running another model (again when yet another one), and
 * `restored()` when it is seen running `modelId` again (a rollback): its answers are then used as before. */
export function expectModel(modelId, { changed, restored }) {
  pageModel = modelId;
  onModelChange = changed;
  onModelBack = restored;
}

function modelChanged(servedId, status, requestId) {
  if (servedId !== servedElsewhere && onModelChange) onModelChange(servedId);
  servedElsewhere = servedId;
  return new ApiError(
    status,
    "model_changed",
    `the service now runs another model (“${servedId}”), not the one this page was set up for (“${pageModel}”)`,
    requestId,
  );
}

// An answer named the page's own model: a banner saying otherwise would now be wrong.
function modelServed() {
  if (servedElsewhere === null) return;
  servedElsewhere = null;
  if (onModelBack) onModelBack();
}

export class ApiError extends Error {
  constructor(status, code, message, requestId = null, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.requestId = requestId;
    this.retryAfter = retryAfter;
  }
}

/**
 * Call the service. `json` sends a JSON body, `form` a FormData (multipart) body.
 * Resolves to the parsed JSON body; rejects with ApiError (or AbortError when `signal` fires), whose code is
 * `model_changed` once the service runs another model than the one in `expectModel`.
 */
export async function api(path, options = {}) {
  let data;
  try {
    data = await request(path, options);
  } catch (e) {
    throw await servedModelError(path, e, options.signal);
  }
  if (pageModel && typeof data.model_id === "string") {
    if (data.model_id !== pageModel) throw modelChanged(data.model_id, 409, null);
    modelServed();
  }
  return data;
}

// `e`, or `model_changed` when `e` rejected the input and the service's card names another model now.
async function servedModelError(path, e, signal) {
  if (!pageModel || !(e instanceof ApiError) || !RECHECK.includes(e.status) || path === "v1/model") return e;
  let served;
  try {
    served = (await request("v1/model", { signal })).model_id;
  } catch {
    return e; // no card just now: the original error is the best there is
  }
  if (typeof served !== "string") return e;
  if (served !== pageModel) return modelChanged(served, e.status, e.requestId);
  modelServed(); // the input itself was refused, by the page's own model
  return e;
}

async function request(path, { method = "GET", json, form, signal } = {}) {
  const headers = { Accept: "application/json" };
  const key = getApiKey();
  if (key) headers["X-API-Key"] = key;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser sets the multipart boundary itself
  }

  let res;
  try {
    res = await fetch(path, { method, headers, body, signal });
  } catch (e) {
    if (e && e.name === "AbortError") throw e;
    throw new ApiError(0, "network_error", "the service could not be reached (is it running?)");
  }
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const err = data && typeof data === "object" && data.error ? data.error : {};
    // A body that is not the service's JSON error came from something in between (a proxy's HTML error
    // page) or from uvicorn itself (plain text): only plain text is worth showing as it is.
    const plain = /^text\/plain\b/i.test(res.headers.get("Content-Type") || "") ? text.trim().slice(0, 300) : "";
    throw new ApiError(
      res.status,
      err.code || `http_${res.status}`,
      err.message || plain || res.statusText || "no details",
      err.request_id || res.headers.get("X-Request-ID"),
      res.headers.get("Retry-After"),
    );
  }
  if (data === null || typeof data !== "object") {
    throw new ApiError(res.status, "bad_response", "the service sent an answer this page cannot read");
  }
  return data;
}

/**
 * Whether asking again later may well succeed: no answer at all (0), a busy or starting service (503), a
 * rate limiter in front of it (429, overloaded by another name), or a proxy that could not reach it (502,
 * 504).
 */
export function isTransient(e) {
  return e instanceof ApiError && [0, 429, 502, 503, 504].includes(e.status);
}

/** Whole seconds from a Retry-After value, or null (it may also be an HTTP date). */
export function retryAfterSeconds(e) {
  const value = e instanceof ApiError ? String(e.retryAfter).trim() : "";
  return /^\d+$/.test(value) ? Number(value) : null;
}

/**
 * A sentence for a person: what went wrong and what to do, then the details for a bug report.
 * `upload` names what was uploaded, when something was: "that file", or for two files
 * { one: "car A or car B", all: "car A and car B together" }; a size or slowness is then blamed on it.
 * `culprit` names the one input the service said it could not use (of several), when it said which.
 */
export function describeError(e, action, { upload = null, culprit = null } = {}) {
  if (!(e instanceof ApiError)) {
    return `${action} failed: ${e && e.message ? e.message : String(e)}`;
  }
  const m = String(e.message).trim().replace(/[.\s]+$/, ""); // sentences below add their own full stop
  const one = culprit || (upload && typeof upload === "object" ? upload.one : upload);
  const all = upload && typeof upload === "object" ? upload.all : upload;
  const cap = (s) => s.charAt(0).toUpperCase() + s.slice(1);
  const seconds = retryAfterSeconds(e);
  const wait = seconds !== null ? ` in ${seconds} s` : " in a moment";
  let text;
  if (e.status === 0) {
    text = `${action} failed: ${m}. Check the connection, then try again.`;
  } else if ((e.status === 401 || e.status === 403) && getApiKey()) {
    // Telling someone who has just saved a key to go and enter one reads as if the page ignored it.
    text = `${action} needs an API key that the service accepts: the one saved in this tab was refused; check it under “API key” at the top of the page (${m}).`;
  } else if (e.status === 401 || e.status === 403) {
    text = `${action} needs an API key: open “API key” at the top of the page and enter it (${m}).`;
  } else if (e.code === "model_changed") {
    text = `${action} failed: ${m}. Reload the page to use the new model.`;
  } else if (e.status === 503 && e.code === "not_ready") {
    text = `The model is still loading (${m}). Please try again${wait}.`;
  } else if (e.status === 503 && e.code === "unavailable") {
    text = `The service is restarting or stopping (${m}). Please try again${wait}.`;
  } else if (e.status === 503 || e.status === 429) {
    // overloaded (a full queue, too many requests or connections), or a rate limit in front of the
    // service (429): the input was fine, so say when to retry.
    text = `The service is busy right now (${m}). Please try again${wait}.`;
  } else if (e.status === 504) {
    text = `The service took too long to answer (${m}). Please try again.`;
  } else if (e.status === 408) {
    // The body (an upload) did not arrive in time: a slow or stalled connection, not a bad input.
    const what = all ? `${cap(all)} did` : "The request did";
    const smaller = !upload ? "" : typeof upload === "object" ? ", or use smaller files" : ", or use a smaller file";
    text = `${what} not reach the service in time (${m}): the connection may be slow. Please try again${smaller}.`;
  } else if (e.status === 413 && e.code === "image_too_large") {
    const what = one ? `${cap(one)} has` : "The image has";
    text = `${what} too many pixels for the service (${m}). Scale the picture down, then try again.`;
  } else if (e.status === 413) {
    // payload_too_large: the whole request body, so every file in it together.
    if (upload && typeof upload === "object") {
      text = `${cap(all)} are too large to upload (${m}): the limit holds for both files together. Use smaller files (a lower resolution or stronger compression).`;
    } else if (upload) {
      text = `${cap(all)} is too large to upload (${m}). Use a smaller file (a lower resolution or stronger compression).`;
    } else {
      text = `${action} failed: the request is too large (${m}).`;
    }
  } else if (e.status >= 400 && e.status < 500) {
    text = `${action} failed — the service could not use ${culprit || "that input"}: ${m}.`;
  } else {
    text = `${action} failed on the server (HTTP ${e.status}): ${m}.`;
  }
  const details = [e.code && `code ${e.code}`, e.requestId && `request ${e.requestId}`].filter(Boolean).join(", ");
  return details ? `${text}\n(${details})` : text;
}
