"""The exported GGUF files run in llama.cpp itself, against transformers (issue 17 item 4).

    .venv/bin/pip install -e '.[llamacpp]'     # llama-cpp-python: compiles llama.cpp (cmake, C++ compiler, minutes)
    .venv/bin/python bench/parity_llamacpp.py --out bench/results/parity_llamacpp.json [--run RUN]

Without --run a short LoRA run on the embedded SmolLM2-135M-Instruct is trained first (alpaca template,
../shared alpaca_en_demo rows without input, `--steps` steps, a held-out split of `--probe-rows` rows).
Then, as a user would:
  1. `tunelab export RUN --to WORK/export --gguf f16` (its parity table has the "llama.cpp f16" step);
  2. the q8_0 GGUF written beside it from the merged export (tunelab.export.write_gguf, what `--gguf q8_0`
     writes); with --verify-only also `tunelab export RUN --to WORK/export --verify-only`, the parity table
     of every file against the adapter model, both llama.cpp steps included. The export's parity.json is
     kept under "export_parity".
Then the bench's own comparison against transformers on the *merged* model (the export's safetensors in
float32), per GGUF type: llama.cpp tokenizes each probe's text as transformers does (the GGUF's
pre-tokenizer metadata), identical greedy continuations out of N and the first divergence, max/mean
|d log p| of the reference answers' tokens, and greedy tokens/s of llama.cpp vs transformers (each
timed on the same prompts and thread count, prompt processing included, one prompt at a time).
Exit 1 when a step fails its parity.THRESHOLDS bound or a tokenization differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "train" / "alpaca_en_demo" / "data.json"


def tunelab(*args: str) -> int:
    cmd = [sys.executable, "-m", "tunelab", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode


def train_run(work: Path, steps: int, probe_rows: int) -> Path:
    rows = 5 * probe_rows  # a quarter held out: more than probe_rows held-out rows, the first probe_rows probed
    cfg = work / "run.yaml"
    cfg.write_text(f"""model: {{name: smollm2-135m, dtype: float32}}
data: {{path: {DATA}, format: alpaca, template: alpaca, only_empty_input: true, max_rows: {rows},
       test_size: 0.25, max_seq_length: 256, drop_untrainable: true, seed: 42}}
lora: {{r: 16, alpha: 16, dropout: 0.0}}
train: {{per_device_train_batch_size: 4, per_device_eval_batch_size: 8, gradient_accumulation_steps: 1,
        warmup_steps: 1, max_steps: {steps}, eval_steps: {steps}, save_steps: {steps}, learning_rate: 1.0e-3}}
""")
    run = work / "run"
    tunelab("train", str(cfg), "--output", str(run))
    if not (run / "adapter_config.json").is_file() and not any(run.glob("checkpoint-*")):
        sys.exit(f"training failed: nothing in {run}")
    return run


def timed_hf_greedy(model, tok, probes, tokens: int) -> tuple[float, int]:
    import torch

    spent, produced = 0.0, 0
    with torch.inference_mode():
        for p in probes:
            x = torch.tensor([p.ids[:p.prompt_len]])
            t0 = time.perf_counter()
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 temperature=None, top_p=None, top_k=None)
            spent += time.perf_counter() - t0
            produced += out.shape[1] - x.shape[1]
    return spent, produced


def version(dist: str) -> str:
    from importlib.metadata import version as v

    return v(dist)


def system_info() -> str:
    """llama.cpp's CPU feature line (AMX_INT8 = 1 when ggml's AMX kernels are built in), from a child process:
    the library is loaded in children only (tunelab/llamacpp.py)."""
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "Flags"):
                v = v.strip()
                info[k.strip()] = " ".join(f for f in v.split() if f.startswith(("avx", "fma", "f16c", "amx")))\
                    if k.strip() == "Flags" else v
    except OSError:
        pass
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a tunelab run folder (default: train a short SmolLM2 run)")
    ap.add_argument("--workdir", type=Path, help="where the run and export go (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "parity_llamacpp.json")
    ap.add_argument("--probe-rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens per probe prompt")
    ap.add_argument("--steps", type=int, default=4, help="training steps of the default run")
    ap.add_argument("--no-export", action="store_true",
                    help="skip `tunelab export` (and its parity table): merge in this process, write both GGUF files, "
                         "compare llama.cpp with transformers only (a busy machine)")
    ap.add_argument("--verify-only", action="store_true",
                    help="also run `tunelab export --verify-only` after the q8_0 file is written (its table then has "
                         "both GGUF types; about doubles the time)")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab import llamacpp
    from tunelab.export import write_gguf
    from tunelab.models import find_run
    from tunelab.parity import THRESHOLDS, compare, measure, probe_set
    from tunelab.rundir import run_config

    work = a.workdir or Path(tempfile.mkdtemp(prefix="parity_llamacpp_"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t_start = time.time()
    run = a.run or train_run(work, a.steps, a.probe_rows)
    export = work / "export"
    if a.no_export:  # only the GGUF files, from the run merged in this process (no safetensors, no export table)
        from tunelab.export import _load_merged
        from tunelab.shiptemplate import jinja_template

        export.mkdir(exist_ok=True)
        _, merged, tok, _, template, cfg = _load_merged(run, "float32")
        chat = jinja_template(template, tok, cfg.data.system_prompt)
        write_gguf(merged, tok, export / "model-f16.gguf", "f16", chat_template=chat)
        write_gguf(merged, tok, export / "model-q8_0.gguf", "q8_0", chat_template=chat)
    else:
        tunelab("export", str(run), "--to", str(export), "--gguf", "f16", "--force",
                "--probe-rows", str(a.probe_rows), "--verify-tokens", str(a.tokens))
        if not (export / "model-f16.gguf").is_file():
            sys.exit("export --gguf f16 failed (output above)")
        tok = AutoTokenizer.from_pretrained(str(export))
        merged = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
        write_gguf(merged, tok, export / "model-q8_0.gguf", "q8_0", chat_template=tok.chat_template)
    if a.verify_only:  # the export's own parity table again, now with both GGUF files (and both llama.cpp steps)
        tunelab("export", str(run), "--to", str(export), "--verify-only",
                "--probe-rows", str(a.probe_rows), "--verify-tokens", str(a.tokens))
    export_parity = None if a.no_export else json.loads((export / "parity.json").read_text())

    run_dir = find_run(run)[0]
    probes, source = probe_set(run_dir, run_config(run_dir), tok, a.probe_rows)
    threads = torch.get_num_threads()
    ref = measure(merged, tok, probes, a.tokens)
    hf_s, hf_n = timed_hf_greedy(merged, tok, probes, a.tokens)
    result = {"probe_source": source, "probes": len(probes), "greedy_tokens": a.tokens, "threads": threads,
              "llama_cpp_python": version("llama_cpp_python"), "llama_cpp_system_info": system_info(),
              "reference": "transformers, merged export, float32",
              "transformers_greedy_tokens_per_s": round(hf_n / hf_s, 2), "per_type": {}}
    ok = True
    for kind in ("f16", "q8_0"):
        path = export / f"model-{kind}.gguf"
        try:
            out = llamacpp.run(path, probes, a.tokens, tok, n_threads=threads)
        except llamacpp.LlamaCppFailed as e:
            result["per_type"][kind] = {"gguf_bytes": path.stat().st_size, "passed": False, "error": str(e)}
            ok = False
            print(f"llama.cpp {kind}: {e}", flush=True)
            continue
        bad = out["tokenize_bad"]
        got = llamacpp.as_measurement(out)
        r = compare(f"llama.cpp {kind}", ref, got)
        tps = out["greedy_tokens"] / out["greedy_seconds"]
        differ = [(tok.decode(x), tok.decode(y)) for x, y in zip(ref[1], got[1]) if x != y][:3]
        passed = r.passed and not bad and out["eos"] == tok.eos_token_id
        result["per_type"][kind] = {
            "gguf_bytes": path.stat().st_size, "tokenization_identical": len(probes) - len(bad),
            "llama_cpp_eos_id": out["eos"], "transformers_eos_id": tok.eos_token_id,
            "greedy_identical": r.greedy_identical, "first_divergence": r.first_divergence,
            "max_abs_dlogp": r.max_abs_dlogp, "mean_abs_dlogp": r.mean_abs_dlogp,
            "bounds": r.bounds, "passed": passed, "llama_cpp_greedy_tokens_per_s": round(tps, 2),
            "differing_continuations": [{"transformers": x, "llama.cpp": y} for x, y in differ]}
        ok &= passed
        print(f"llama.cpp {kind}: tokenization {len(probes) - len(bad)}/{len(probes)}, greedy "
              f"{r.greedy_identical}/{len(probes)} (first divergence {r.first_divergence}), max|dlogp| "
              f"{r.max_abs_dlogp:.2e} mean {r.mean_abs_dlogp:.2e}, {tps:.1f} tok/s vs transformers "
              f"{hf_n / hf_s:.1f} tok/s -> {'ok' if passed else 'FAIL'}", flush=True)
    result.update(export_parity=export_parity, thresholds={k: list(v) for k, v in THRESHOLDS.items()},
                  machine=machine(), load_avg_before=[round(x, 2) for x in load_before],
                  load_avg_after=[round(x, 2) for x in os.getloadavg()], wall_s=round(time.time() - t_start, 1),
                  passed=ok and (export_parity or {}).get("passed", True), run=str(run), workdir=str(work),
                  commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=ROOT).stdout.strip())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
