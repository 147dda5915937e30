# M4I: `make demo` runs a complete controlled CLIP audit (`make demo-captioning` the captioner one);
# `make test` runs the test suite.
# Both create .venv on first use. Everything the platform writes goes under $(M4I_HOME).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
M4I_HOME ?= $(CURDIR)/.m4i
export M4I_HOME

.PHONY: venv services demo demo-captioning demo-defenses test dev report ui-check bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: venv
	$(VENV)/bin/m4i demo

# The M^4I captioning audit (its own target, null control and shadow captioners): a separate command
# because the two audits together take longer than the 15 minutes a demo may.
demo-captioning: venv
	$(VENV)/bin/m4i demo --family captioner

# Defenses (DP-SGD, regularisation, output perturbation) of both targets, audited and set against their
# utility, on the reduced `defenses` profile (its own audit: smaller sets and grid; about an hour on 2 cores).
demo-defenses: venv
	M4I_PROFILE=defenses $(VENV)/bin/m4i demo --family all --defenses

report: venv
	$(VENV)/bin/m4i report

# tests/test_distributed.py starts its own redis-server and PostgreSQL on 127.0.0.1: Debian's packages,
# installed here when missing (as root).
services:
	@if ! command -v redis-server >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make test needs redis-server and postgresql (apt-get install, as root)"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server postgresql; \
	fi

test: venv services
	$(VENV)/bin/pytest -q

dev: venv
	DAGSTER_HOME=$$($(VENV)/bin/m4i home) $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# Serves the Dagster UI on 127.0.0.1 and saves what a person looks at, checked, under $(M4I_HOME)/ui/: the
# expanded asset graph, the target's attack_metrics materialization, its paired comparisons and its ROC plot
# (after `make demo`).
# Installs Debian's chromium when missing (as root; otherwise it says how).
ui-check: venv
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q && apt-get install -y -q chromium; } \
		|| { echo "make ui-check needs Chromium: run 'apt-get install chromium' as root"; exit 1; }
	$(VENV)/bin/m4i ui-check

bench: venv
	$(PY) bench/embeddings.py

clean:
	rm -rf $(M4I_HOME)
