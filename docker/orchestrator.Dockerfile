# The orchestrator (`pairloop`): `pairloop run CONFIG` executes a run; `pairloop api` (the default
# command) serves the status API and best-of-n chat. No torch, vLLM, llm-blender or TRL inside
# (requirements/images/orchestrator.txt).
#
#   docker build -f docker/orchestrator.Dockerfile -t pairloop/orchestrator:0.1.0 .
# Build arguments (defaults: the public registries; `make compose-test` builds the CPU images with
# no registry at all, see README "Building without a registry"):
#   PYTHON_IMAGE     a Debian 12 / Python 3.11 base with `python3 -m venv` (default python:3.11 slim)
#   PIP_INDEX_URL    the package index (unset: pip's own default);  PIP_NO_INDEX=1: only docker/wheelhouse/ (no index at all)
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
# --- end of the shared stages ------------------------------------------------------------------

FROM python AS orchestrator-deps
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX=0
COPY requirements/images/orchestrator.txt /opt/pairloop/requirements/orchestrator.txt
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    PIP_FIND_LINKS=/wheels pip install --no-deps -r /opt/pairloop/requirements/orchestrator.txt

# --- final ------------------------------------------------------------------------------------
FROM orchestrator-deps
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist pip install --no-deps /dist/*.whl
# uid 10001 owns /models, so a fresh named volume mounted there is writable (Docker copies the
# image directory's ownership into an empty volume; on Kubernetes, fsGroup does this).
RUN useradd --create-home --uid 10001 --user-group pairloop \
 && mkdir -p /models && chown pairloop:pairloop /models
# The demo's prompts at a fixed path, for the CPU demo run configs (compose and k8s).
COPY orchestrator/demo/prompts.jsonl /opt/pairloop/demo/prompts.jsonl
# What the compose stack's orchestrator runs on every `up`: create the run, or resume it.
COPY docker/run-or-resume.sh /usr/local/bin/pairloop-run-or-resume
ENV HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_OFFLINE=0 \
    PYTHONUNBUFFERED=1 \
    PAIRLOOP_ORCHESTRATOR_HOST=0.0.0.0 \
    PAIRLOOP_ORCHESTRATOR_PORT=8080
# HOME explicitly: Kubernetes runtimes do not all derive it from /etc/passwd for a numeric uid.
# Caches and per-user config (vLLM, torch, matplotlib) under /tmp, so the root filesystem can be
# read-only (compose mounts a tmpfs there; Hugging Face's cache is HF_HOME on the model store).
ENV HOME=/home/pairloop \
    XDG_CACHE_HOME=/tmp/cache \
    XDG_CONFIG_HOME=/tmp/config \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001
WORKDIR /home/pairloop
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
ENTRYPOINT ["pairloop"]
CMD ["api"]
