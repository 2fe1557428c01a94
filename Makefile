# Every target creates and uses .venv itself; nothing needs to be installed first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STORE ?= .cmesh/store
CONFIG ?= compose/mesh.yaml
PYTEST_ARGS ?=

KSERVE_VENV ?= .cmesh/kserve-venv

.PHONY: venv install redis protos bootstrap test up serve clean help kserve-venv

help:
	@echo "make up      install, bootstrap the demo model store, start the mesh"
	@echo "make test    install and run the test suite"
	@echo "make protos  regenerate protos/*_pb2*.py(i) from the .proto sources"

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints-cpu.txt
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

venv: install

# Debian's redis-server; tests start their own instance on a free port.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# KServe (PyPI kserve) for tests/test_kserve_backend.py, in a venv of its own: its stubs
# register the protobuf package `inference` too, so it cannot share .venv.
$(KSERVE_VENV)/.installed:
	$(PY) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install -q kserve==0.21.0
	touch $@

kserve-venv: $(KSERVE_VENV)/.installed

protos: $(STAMP)
	$(BIN)/python -m protos.compile

bootstrap: $(STAMP)
	$(BIN)/cmesh models bootstrap --store $(STORE)

test: $(STAMP) redis kserve-venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

up: $(STAMP) bootstrap
	$(BIN)/python -m cmesh.up --config $(CONFIG)

clean:
	rm -rf $(VENV) .cmesh .pytest_cache
