# syntax=docker/dockerfile:1
# The dsmi-reid matching service: ONNX Runtime, no PyTorch, the bundled model inside.
#
#   CPU (default, slim):  docker build -t dsmi-reid .
#   GPU (CUDA 13):        docker build --target gpu -t dsmi-reid:gpu .
#   run:                  docker run -p 8000:8000 dsmi-reid   (or: docker compose up)
#
# The install steps are the README's (pip install '.[serve]', then dsmi serve), which CI runs;
# the CPU image takes the CPU-only ONNX Runtime build ('.[serve-cpu]') to stay small.

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# --- build the wheel once; neither runtime image keeps sources or build tools ---------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY service ./service
COPY dsmi_cli ./dsmi_cli
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -c "import sys, zipfile, glob; names = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]).namelist(); sys.exit(0 if any(n.startswith('service/default_model/manifest.json') for n in names) else 'the bundled model is missing from the wheel')"

# --- CPU image (default target: the last stage is gpu, so name this one in compose) --------
FROM python:${PYTHON_VERSION}-slim-bookworm AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DSMI_PROVIDERS=cpu
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin dsmi
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/dsmi_reid-*.whl)[serve-cpu]"
USER dsmi
WORKDIR /home/dsmi
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["dsmi", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]

# --- GPU image: CUDA + cuDNN runtime, onnxruntime-gpu (built for CUDA 13) -------------------
FROM ${CUDA_IMAGE} AS gpu
ARG PYTHON_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python UV_NO_CACHE=1 \
    PATH=/opt/venv/bin:$PATH \
    DSMI_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
# Ubuntu 24.04 ships Python 3.12; uv installs a standalone 3.11 without build tools.
COPY --from=ghcr.io/astral-sh/uv:0.9 /uv /usr/local/bin/uv
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    uv venv --python ${PYTHON_VERSION} /opt/venv \
 && uv pip install --python /opt/venv/bin/python "$(ls /wheels/dsmi_reid-*.whl)[serve]" \
 && rm /usr/local/bin/uv \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin dsmi
USER dsmi
WORKDIR /home/dsmi
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["dsmi", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]

# `docker build .` builds the last stage; make that the slim CPU image.
FROM cpu AS default
