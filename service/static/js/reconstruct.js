// Upload → POST /reconstruct: shows the model's view of the photo beside its reconstruction, the PSNR
// between them and a download link, then hands the photo's latent mean to the explorer.

import { api, describeError } from "./api.js";
import { dataUrl, fileDropTarget, newestRequest, notAFile, readFile, say, setBusy } from "./util.js";

export function createReconstructor(els, model, explorer) {
  const size = `${model.image_size}×${model.image_size}`;
  const requests = newestRequest();

  async function reconstruct(file) {
    // A newer photo supersedes the one still uploading or waiting for its answer: that request is cancelled.
    const { signal, current } = requests.next();
    const loadsBefore = explorer.loads();
    say(els.msg, `Reconstructing “${file.name}”…`);
    setBusy(els.busy, true);
    try {
      const form = new FormData();
      form.append("file", await readFile(file, "the file"), file.name);
      if (!current()) return;
      const res = await api("reconstruct", { method: "POST", form, signal });
      if (!current()) return;
      const recon = dataUrl(res.image, res.format);
      els.original.src = dataUrl(res.input, "png");
      els.original.alt = `${file.name} resized to ${size} pixels, the model's input`;
      els.recon.src = recon;
      els.recon.alt = `The model's ${size} reconstruction of ${file.name}`;
      els.psnr.textContent = `${Number(res.psnr).toFixed(2)} dB`;
      els.download.href = recon;
      els.download.download = `${file.name.replace(/\.[^.]*$/, "") || "car"}-reconstruction.${res.format}`;
      els.compare.hidden = false;
      els.resultBar.hidden = false;
      say(els.msg, `Reconstructed “${file.name}”: PSNR ${Number(res.psnr).toFixed(2)} dB.`, "ok");
      // /reconstruct returns μ; older services may not, so fall back to /encode.
      const mu = Array.isArray(res.mu) ? res.mu : (await api("encode", { method: "POST", form, signal })).mu;
      // Unless the visitor loaded another code into the explorer while this photo was on its way.
      if (current()) explorer.load(mu, `The latent mean of “${file.name}”`, loadsBefore);
    } catch (e) {
      if (!current()) return;
      // Hide the previous result: it would read as the answer for this file.
      els.compare.hidden = true;
      els.resultBar.hidden = true;
      say(els.msg, describeError(e, `Reconstructing “${file.name}”`, { upload: `“${file.name}”` }), "error");
    } finally {
      if (current()) setBusy(els.busy, false);
    }
  }

  // Nothing is sent, so the result shown (if any) stays what it was.
  fileDropTarget(els.zone, els.input, reconstruct, {
    onNoFile: () => say(els.msg, notAFile("Nothing to reconstruct"), "error"),
  });
  return { reconstruct };
}
