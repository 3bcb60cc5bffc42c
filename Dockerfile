# carvae images: one multi-stage build, two targets.
#   docker build --target trainer -t carvae-trainer .
#   docker build --target service -t carvae-service .     (also the default target)
#
# Build arguments:
#   PYTHON_IMAGE     base image of every stage (default python:3.11-slim; 3.11 or newer: the deps stage reads
#                    pyproject.toml with tomllib)
#   TORCH_VERSION    default 2.13.0
#   TORCH_INDEX_URL  where torch comes from when building online; the CPU build by default. For a CUDA
#                    image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#                    --build-arg WHEELHOUSE=off (or deploy/compose.gpu.yml)
#   WHEELHOUSE       auto (default): when wheelhouse/ in the build context holds wheels, install only from
#                    them (pip --no-index, no network needed; fill it with .ci/wheelhouse.sh), otherwise
#                    from the package index. off: always the index. on: the wheelhouse or fail.
#   SLIM_TORCH       1 (default): leave torch's C++ tests, test binaries and headers out; 0 keeps them
ARG PYTHON_IMAGE=python:3.11-slim

# --- deps: the virtualenv with every third-party dependency (no carvae code) -------------------------
FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELHOUSE=auto
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A virtualenv rather than site-packages: it copies cleanly into the runtime stages whatever the base
# image's Python layout (the official image's /usr/local, or Debian's dist-packages).
RUN python -m venv /opt/venv
WORKDIR /build
COPY deploy/pip-install.sh /usr/local/bin/pip-install
COPY wheelhouse/ /build/wheelhouse/
# torch alone first: the biggest layer, rebuilt only when the torch arguments or the wheelhouse change.
RUN pip-install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# The other dependencies from pyproject.toml, at the versions CI tested together (constraints.txt, which
# `make lock` writes; it also brings torch's own requirements to those versions). torch is already
# satisfied, so it is not touched.
COPY pyproject.toml constraints.txt /build/
# Those only the trainer imports ([tool.carvae] trainer-only) go to trainer-requirements.txt instead: the
# trainer-deps stage below.
COPY deploy/split-requirements.py /build/
RUN python split-requirements.py pyproject.toml requirements.txt trainer-requirements.txt \
    && pip-install -r requirements.txt -c constraints.txt \
    && /opt/venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# The torch wheel ships its C++ test suite, test binaries and C++ headers (~190 MB); nothing here runs
# them or builds C++ extensions (the slim images have no compiler). SLIM_TORCH=0 keeps them.
ARG SLIM_TORCH=1
RUN if [ "${SLIM_TORCH}" = 1 ]; then \
        torch_dir="$(/opt/venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" \
        && rm -rf "${torch_dir}/test" "${torch_dir}/include" \
        && find "${torch_dir}/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} + \
        && /opt/venv/bin/python -c "import torch; torch.ones(2, 2).sum()"; \
    fi

# --- trainer-deps: the trainer-only packages, in a folder of their own -----------------------------------
# What the venv lacks for them (pip's own dry-run report lists it, their dependencies included), installed
# without the rest into /opt/trainer-deps, which the trainer image adds to its path. The service image
# leaves them out, and both images still share one layer for the big venv.
FROM deps AS trainer-deps
RUN pip-install --dry-run --quiet --report report.json -r trainer-requirements.txt -c constraints.txt \
    && python -c "import json; print('\n'.join('%s==%s' % (p['metadata']['name'], p['metadata']['version']) for p in json.load(open('report.json'))['install']))" \
        > trainer-pins.txt \
    && cat trainer-pins.txt \
    && pip-install --no-deps --target /opt/trainer-deps -r trainer-pins.txt

# --- runtime: what both images share ------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# The same fixed uid/gid in both images: the trainer writes the models volume, the service reads it.
RUN groupadd --system --gid 10001 carvae \
    && useradd --system --uid 10001 --gid carvae --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin carvae \
    && mkdir -p /models \
    && chown carvae:carvae /models
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
COPY carvae/ /app/carvae/
# COPY keeps the build context's file modes: from a checkout made under umask 077 the code would be
# root-only (0600) and the non-root user could not import it. So: readable by all, writable by none but
# root, and byte-compiled at build time (the code is read-only for the user at run time).
RUN chmod -R a+rX,go-w /app/carvae && python -m compileall -q /app/carvae

# --- trainer: python -m trainer ------------------------------------------------------------------------
FROM runtime AS trainer
COPY --from=trainer-deps /opt/trainer-deps /opt/trainer-deps
ENV PYTHONPATH=/app:/opt/trainer-deps
COPY trainer/ /app/trainer/
COPY deploy/trainer-entrypoint.sh /usr/local/bin/carvae-trainer
RUN chmod -R a+rX,go-w /app/trainer && chmod 0755 /usr/local/bin/carvae-trainer \
    && python -m compileall -q /app/trainer
# matplotlib (the training plots) wants a writable config/cache directory.
ENV MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache
LABEL org.opencontainers.image.title="carvae-trainer" \
      org.opencontainers.image.description="Trains the carvae car VAE into a model.safetensors"
USER 10001:10001
VOLUME ["/models"]
ENTRYPOINT ["carvae-trainer"]

# --- service: python -m service (the default target) --------------------------------------------------
FROM runtime AS service
COPY service/ /app/service/
RUN chmod -R a+rX,go-w /app/service && python -m compileall -q /app/service
ENV CARVAE_HOST=0.0.0.0 \
    CARVAE_PORT=8000 \
    CARVAE_CHECKPOINT=/models/current/model.safetensors
LABEL org.opencontainers.image.title="carvae-service" \
      org.opencontainers.image.description="FastAPI service for the carvae car VAE"
USER 10001:10001
EXPOSE 8000
# No curl in the slim image: ask /readyz with the Python that is there; an HTTP error or a refused
# connection raises, and python exits 1 (unhealthy). /readyz answers 503 until the model is warmed up.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CARVAE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["python", "-m", "service"]
