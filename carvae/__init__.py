"""carvae: the shared core of the car VAE (model, image pre/post-processing, checkpoint I/O, device picker).

Both the trainer and the service import from here; nothing in this package knows about HTTP or CLIs.
"""

__version__ = "0.1.0"
