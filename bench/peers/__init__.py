"""Peer servers the benchmark measures against: the same model and the same carvae.preprocess code,
served by LitServe (its batching) and by a plain FastAPI handler (no batching)."""
