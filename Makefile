# Two commands on a fresh machine: `make demo` and `make test`.
# The venv gets the CPU build of torch pinned for the project's machines (2 cores, no GPU);
# the package itself asks only for a loose `torch>=2.1`, so a GPU user keeps their own build.
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: setup demo test bench readme clean

# setup: the package and what it needs (enough for the demo); the tests' extras come on top, for `make test` only.
$(BIN)/critical-tokens: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e . "$(TORCH_PIN)"  # the pin keeps torch
	touch $@

$(VENV)/.test-extras: $(BIN)/critical-tokens
	$(BIN)/pip install -q -e ".[test,trl,ray,slurm]" "$(TORCH_PIN)"  # the extras the tests need (TRL, ray and submitit: about 30 s)
	touch $@

setup: $(BIN)/critical-tokens

demo: setup
	$(BIN)/critical-tokens reproduce --preset cpu --out $(OUT)
	@echo "the report: $(OUT)/REPORT.md, in a browser: $(OUT)/report.html"

test: $(VENV)/.test-extras
	$(BIN)/python -m pytest -q

bench: $(VENV)/.test-extras
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/pretrain.py
	$(BIN)/python benchmarks/rl.py
	$(BIN)/python benchmarks/trl_prioritized.py

readme: setup  # the numbers of the README and docs/RESULTS.md, from the committed reports' summary.json (docs/results/*/)
	$(BIN)/python -m critical_tokens.report.readme README.md
	$(BIN)/python -m critical_tokens.report.readme docs/RESULTS.md

clean:
	rm -rf $(VENV) runs build *.egg-info
