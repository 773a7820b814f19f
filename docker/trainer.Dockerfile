# The DPO trainer worker (`python -m services.trainer`: validates PAIRLOOP_TRAINER_* settings, then
# execs `celery -A services.trainer.celery_app worker --without-gossip --without-mingle
# --without-heartbeat`). With several GPUs visible the worker runs `accelerate launch` itself.
#
#   docker build -f docker/trainer.Dockerfile -t pairloop/trainer:0.1.0 .                      # CUDA torch
#   docker build -f docker/trainer.Dockerfile --build-arg VARIANT=cpu -t pairloop/trainer-cpu:0.1.0 .
#
# TRL, peft, accelerate, datasets and Celery (requirements/images/trainer.txt), no vLLM.
# Build arguments (defaults: the public registries; `make compose-test` builds the CPU images with
# no registry at all, see README "Building without a registry"):
#   PYTHON_IMAGE     a Debian 12 / Python 3.11 base with `python3 -m venv` (default python:3.11 slim)
#   PIP_INDEX_URL    the package index (unset: pip's own default);  PIP_NO_INDEX=1: only docker/wheelhouse/ (no index at all)
#   TORCH_INDEX_URL  where torch's CPU build comes from (CPU variant)
ARG VARIANT=gpu
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- shared stages: the same text in the generator, ranker and trainer Dockerfiles (the
# orchestrator's shares the first three), so Docker builds them once and stores one copy -------
# The wheelhouse: docker/wheelhouse/ (empty in the repository; see its README), mounted as pip's
# --find-links, never copied into an image. PIP_NO_INDEX=1 installs from it alone (air-gapped).
FROM scratch AS wheelhouse
COPY docker/wheelhouse/ /

FROM ${PYTHON_IMAGE} AS python
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv

# A wheel of pairloop itself: no source tree or build tools reach the runtime stages.
FROM python AS wheel
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX=0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pairloop pairloop
COPY pairloop_local pairloop_local
COPY services services
COPY orchestrator orchestrator
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    PIP_FIND_LINKS=/wheels pip wheel --no-deps --wheel-dir /dist .

# torch and transformers (requirements/images/models.txt, cut from the lock), --no-deps as
# `make setup` installs. CPU: torch's CPU build (PyPI's Linux wheel is the CUDA one).
FROM python AS models-cpu
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX=0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements/images/models.txt /opt/pairloop/requirements/models.txt
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    PIP_FIND_LINKS=/wheels pip install --no-deps --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
 && PIP_FIND_LINKS=/wheels pip install --no-deps -r /opt/pairloop/requirements/models.txt

# GPU: PyPI's torch==2.13.0 is the CUDA build and pins its CUDA runtime (nvidia-* wheels), so the
# Python base plus the host driver is a complete CUDA PyTorch; the lock constrains what it adds.
FROM python AS models-gpu
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX=0
COPY requirements/images/models.txt /opt/pairloop/requirements/models.txt
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    PIP_FIND_LINKS=/wheels pip install --constraint /opt/pairloop/requirements/models.txt torch==2.13.0 \
 && PIP_FIND_LINKS=/wheels pip install --no-deps -r /opt/pairloop/requirements/models.txt
# --- end of the shared stages ------------------------------------------------------------------

# --- the training stack's closure (requirements/images/trainer.txt) on the torch layer -------
FROM models-${VARIANT} AS trainer-deps
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX=0
COPY requirements/images/trainer.txt /opt/pairloop/requirements/trainer.txt
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    PIP_FIND_LINKS=/wheels pip install --no-deps -r /opt/pairloop/requirements/trainer.txt

# --- final ------------------------------------------------------------------------------------
FROM trainer-deps
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist pip install --no-deps /dist/*.whl
# uid 10001 owns /models, so a fresh named volume mounted there is writable (Docker copies the
# image directory's ownership into an empty volume; on Kubernetes, fsGroup does this).
RUN useradd --create-home --uid 10001 --user-group pairloop \
 && mkdir -p /models && chown pairloop:pairloop /models
ENV HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_OFFLINE=0 \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1
# HOME explicitly: Kubernetes runtimes do not all derive it from /etc/passwd for a numeric uid.
# Caches and per-user config (vLLM, torch, matplotlib) under /tmp, so the root filesystem can be
# read-only (compose mounts a tmpfs there; Hugging Face's cache is HF_HOME on the model store).
ENV HOME=/home/pairloop \
    XDG_CACHE_HOME=/tmp/cache \
    XDG_CONFIG_HOME=/tmp/config \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001
WORKDIR /home/pairloop
# No HTTP server: the worker is healthy when it answers a Celery control ping (it names itself
# trainer@<hostname>, see services/trainer/__main__.py).
HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 \
    CMD celery -A services.trainer.celery_app inspect ping --destination "trainer@$(hostname)" --timeout 10
ENTRYPOINT ["python3", "-m", "services.trainer"]
