# The two commands a new user types. Each does its own set-up from a fresh clone and
# is quick when already set up (the stamp is rebuilt only when the recipe changes).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: demo test test-fast setup clean

demo: $(STAMP)
	$(PY) -m sparse_mae.cli pretrain experiment=demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

setup: $(STAMP)

$(STAMP): pyproject.toml tools/setup_env.sh
	VENV=$(VENV) bash tools/setup_env.sh
	touch $(STAMP)

clean:
	rm -rf $(VENV) .venv-timm .pytest_cache
