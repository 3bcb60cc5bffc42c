"""HTTP routes, one module per resource: images (reconstruct/encode/interpolate), latent (sample/decode),
meta (model info, health, readiness, metrics, the web page)."""
