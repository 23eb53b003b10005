# tvpack developer commands. Every target installs what it needs on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# torch from this machine's disk; never uv/poetry (they would download gigabytes)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -n 2

.PHONY: install test demo bench sweep lint clean system-deps docs docs-build

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[test,docs]'
	touch $(STAMP)

# nginx for the mirror tests (moto's S3 server comes with the test extra); the CNCF distribution registry,
# htpasswd, skopeo and umoci for the OCI tests and benchmarks; podman, runc and busybox-static for the container
# runtime tests (tests/test_podman.py)
SYSTEM_PACKAGES := nginx-light docker-registry apache2-utils skopeo umoci podman runc busybox-static
system-deps:
	@missing=""; for tool in nginx docker-registry htpasswd skopeo umoci podman runc busybox; do \
	  command -v $$tool >/dev/null 2>&1 || [ -x /usr/sbin/$$tool ] || missing=1; done; \
	[ -z "$$missing" ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); }

# the docs site is built with --strict (a broken link or a page left out of the nav fails); tests/test_docs.py
# runs every command block of README.md and docs/*.md as written
test: install system-deps lint docs-build
	$(PY) -m pytest -q $(PYTEST_ARGS)

docs-build: install
	$(PY) -m mkdocs build --strict -q

# serve the docs site at http://127.0.0.1:8000 (reloads on edit)
docs: install
	$(PY) -m mkdocs serve

demo: install
	$(PY) scripts/demo.py

# aria2c is the segmented-download baseline of scripts/bench_segments.py
bench: install system-deps
	@command -v aria2c >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq aria2; }
	$(PY) scripts/bench.py $(BENCH)

# every torchvision weights up to SWEEP_MB: synthetic checkpoint -> bundle -> install -> load_model,
# compared with torchvision's own get_model (about 11 minutes at 200 MB on 2 cores)
SWEEP_MB ?= 200
sweep: install
	$(PY) -W ignore::UserWarning -W ignore::DeprecationWarning scripts/sweep_registry.py --max-mb $(SWEEP_MB)

lint: install
	$(PY) -m ruff check -q packager tests scripts

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
