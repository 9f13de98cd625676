# The two commands of the README: `make serve` and `make test`.
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: install model serve test clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

# Convert the embedded model once; later runs find it in the cache.
model: install
	$(VENV)/bin/python -m deployments.models.embedded prepare

serve: model
	$(VENV)/bin/python scripts/serve.py

test: model
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
