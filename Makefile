# The two commands of the README: `make serve` and `make test`.
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: install model serve test soak clean

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

# Two minutes at ten times what the app completes (bench/soak.py; about 6 minutes in all).
soak: model
	$(VENV)/bin/python bench/soak.py --out docs/bench/soak

clean:
	rm -rf $(VENV) .pytest_cache
