"""Measure what `tunelab plan` estimates, on this machine: peak RSS and seconds per step of real runs.

    .venv/bin/python bench/bench_plan.py --steps 4 --out bench/results/plan_validation.json
    .venv/bin/python bench/bench_plan.py --configs configs/smollm2-demo.yaml configs/smollm2-alpaca.yaml

Each config trains --steps optimizer steps (no evaluation, no checkpoint) in its own process; the
step time is the median of steps 2..N (step 1 warms up), the peak is the process's VmHWM (peak RSS)
after training, which is what the plan's cpu estimate predicts. The machine's load average and the
fp32 matmul rate just before and after training are recorded: on a shared 2-core machine a step is only
as fast as the share of the cores it gets, so the test also evaluates the plan's time model at that
measured rate (FLOP count x efficiency, separated from the load).
The JSON is a list of measured points that tests/test_plan.py compares with the estimator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.eval_steps=100000", "train.save_steps=100000", "eval.eval_on_start=false",
             "train.logging_steps=1", "train.report_to=[]"]


def matmul_gflops(n: int = 2048, reps: int = 3) -> float:
    """Best fp32 matmul rate of this process right now (all torch threads): the machine's peak under the
    load of the moment, which the plan's time model divides by."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def worker(config: str, steps: int, out: str) -> None:
    """Runs in a child process: train, time each optimizer step, print one JSON line."""
    sys.path.insert(0, str(REPO))
    from transformers import TrainerCallback

    from tunelab import cli, train
    from tunelab.config import load_config

    cli._quiet_libraries()
    times: list[float] = []

    class StepTimer(TrainerCallback):
        t = None

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    make = train.make_trainer

    def make_timed(model, args, s):
        trainer = make(model, args, s)
        trainer.add_callback(StepTimer())
        return trainer

    train.make_trainer = make_timed
    cfg, _ = load_config(config, OVERRIDES + [f"train.max_steps={steps}", "train.warmup_steps=0"])
    before = matmul_gflops()
    summary = train.run(cfg, Path(out), config_dir=(REPO / config).parent)
    after = matmul_gflops()
    timed = sorted(times[1:]) or times
    print("@@" + json.dumps({"step_times_s": [round(t, 3) for t in times],
                             "s_per_step": round(timed[len(timed) // 2], 3),
                             "peak_rss_gib": summary["peak_rss_gib"],
                             "matmul_gflops_before_after": [round(before, 1), round(after, 1)]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["configs/smollm2-demo.yaml"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "bench/results/plan_validation.json"))
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), a.worker[2])
        return
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    points = []
    for config in a.configs:
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            p = subprocess.run([sys.executable, __file__, "--worker", config, str(a.steps), f"{tmp}/run"],
                               capture_output=True, text=True, cwd=REPO)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("@@")), None)
        if line is None:
            sys.exit(f"{config}: training failed:\n{p.stderr[-2000:]}")
        m = json.loads(line[2:])
        points.append({"id": f"this machine: {Path(config).stem}", "config": config,
                       "overrides": OVERRIDES + [f"train.max_steps={a.steps}", "train.warmup_steps=0"],
                       "device": "cpu", "steps": a.steps, **m,
                       "load_avg_before": [round(x, 2) for x in load_before],
                       "load_avg_after": [round(x, 2) for x in os.getloadavg()],
                       "cpu_count": os.cpu_count(), "commit": commit,
                       "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "source": f"bench/bench_plan.py --steps {a.steps} (peak RSS = VmHWM; s/step = median of steps 2..N)"})
        print(json.dumps(points[-1]))
    Path(a.out).write_text(json.dumps(points, indent=2) + "\n")


if __name__ == "__main__":
    main()
