# The two commands of the README: `make serve` and `make test`.
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: install model serve test unit fuzz soak clean

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

# The pure tests only: no Ray, no engine, no port 8000, so they may run beside a live suite (about a minute).
unit: install
	$(VENV)/bin/python -m pytest -m "not integration and not runs_first and not runs_last"

# The deep fuzz run of tests/test_fuzz.py (the suite runs a short seeded one);
# the session fixtures start and stop Ray and the app as for `make test`.
fuzz: model
	FUZZ_DEEP=1 $(VENV)/bin/python -m pytest tests/test_fuzz.py

# Two minutes at ten times what the app completes (bench/soak.py; about 6 minutes in all).
soak: model
	$(VENV)/bin/python bench/soak.py --out docs/bench/soak

clean:
	rm -rf $(VENV) .pytest_cache
