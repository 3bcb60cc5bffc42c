"""carvae's trainer: `python -m trainer` builds a self-describing `model.safetensors` from a folder of
car photos (or the embedded synthetic cars); `python -m trainer.evaluate` scores a checkpoint against PCA."""
