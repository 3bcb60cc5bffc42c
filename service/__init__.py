"""carvae's HTTP service: FastAPI app serving one VAE checkpoint with dynamic batching.

`python -m service` runs it; `service.main.create_app(settings)` builds the app (tests, embedding).
"""
