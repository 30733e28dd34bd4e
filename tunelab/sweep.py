"""`tunelab sweep run.yaml --param train.learning_rate=1e-5,1e-4,5e-4 [--param lora.r=8,16]`

A grid over any config keys. Every trial config is validated before the first trial starts; each
trial trains in its own process and run folder (a crash marks that trial failed and the sweep goes
on); finished trials are skipped on a rerun and interrupted ones resume from their checkpoints.
The end: one table, one plot of the eval-loss curves, the best trial by `--metric`.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from .config import ConfigError, load_config
from .fsutil import atomic_write_text
from .ui import console, show

METRICS = {"best_eval_loss": min, "eval_loss": min, "train_loss": min}


def parse_params(params: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for p in params:
        if "=" not in p:
            raise ConfigError(f"--param: expected KEY=V1,V2,..., got '{p}'")
        key, values = p.split("=", 1)
        vals = [v.strip() for v in _split_values(values) if v.strip()]
        if not vals:
            raise ConfigError(f"--param {key}: no values")
        grid.append((key.strip(), vals))
    return grid


def _split_values(s: str) -> list[str]:
    """Split on commas outside brackets, so `lora.target_modules=[q_proj,v_proj],[q_proj]` works."""
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "[{" and 1 or (ch in "]}" and -1 or 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def trial_name(i: int, assignment: dict[str, str]) -> str:
    parts = ",".join(f"{k.split('.')[-1]}={v}" for k, v in assignment.items())
    safe = "".join(c if c.isalnum() or c in "=,.-_" else "_" for c in parts)
    return f"t{i:02d}-{safe}"[:120]


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="grid sweep over config keys, one run folder per trial")
    p.add_argument("config")
    p.add_argument("--param", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="a config key and its values (repeat for a grid over several keys)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed overrides for every trial")
    p.add_argument("--output", "-o", help="sweep folder (default: runs/<config>-sweep)")
    p.add_argument("--metric", default="best_eval_loss", choices=sorted(METRICS))
    p.add_argument("--workers", type=int, default=1, help="trials run in parallel processes")


def _curve(trial: Path) -> list[tuple[int, float]]:
    states = sorted(trial.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        return []
    hist = json.loads(states[-1].read_text())["log_history"]
    return [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]


def cmd_sweep(args) -> int:
    grid = parse_params(args.param)
    keys = [k for k, _ in grid]
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*[v for _, v in grid])]
    if args.workers <= 0:
        raise ConfigError(f"--workers must be > 0, got {args.workers}")
    # Validate every trial before anything runs.
    problems = []
    for combo in combos:
        try:
            load_config(args.config, list(args.overrides) + [f"{k}={v}" for k, v in combo.items()])
        except ConfigError as e:
            problems.append(f"{', '.join(f'{k}={v}' for k, v in combo.items())}: {e}")
    if problems:
        raise ConfigError(f"{len(problems)} of {len(combos)} trials are invalid, nothing was run: " + " | ".join(problems))
    out = Path(args.output) if args.output else Path("runs") / f"{Path(args.config).stem}-sweep"
    out.mkdir(parents=True, exist_ok=True)
    trials = [{"name": trial_name(i, c), "params": c} for i, c in enumerate(combos)]
    atomic_write_text(out / "sweep.json", json.dumps({"config": str(args.config), "overrides": args.overrides,
                                                     "grid": grid, "trials": trials}, indent=2))
    threads = max(1, (os.cpu_count() or 1) // args.workers)

    def run_trial(t: dict) -> dict:
        folder = out / t["name"]
        summary = folder / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
            return {**t, "status": "done (kept)", "summary": json.loads(summary.read_text())}
        cmd = [sys.executable, "-m", "tunelab", "train", str(args.config), "--output", str(folder), "--resume"]
        for s in list(args.overrides) + [f"{k}={v}" for k, v in t["params"].items()]:
            cmd += ["--set", s]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        console.print(f"[bold]{t['name']}[/bold] started")
        with (out / f"{t['name']}.log").open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0 or not summary.is_file():
            last = [l for l in (out / f"{t['name']}.log").read_text(errors="replace").splitlines() if l.strip()]
            reason = last[-1] if last else f"exit code {rc}"
            console.print(f"[red]{t['name']} failed[/red]: {reason}")
            return {**t, "status": "failed", "reason": reason}
        console.print(f"[green]{t['name']} done[/green]")
        return {**t, "status": "done", "summary": json.loads(summary.read_text())}

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run_trial, trials))
    finish(out, results, keys, args.metric)
    return 0 if any(r["status"].startswith("done") for r in results) else 2


def finish(out: Path, results: list[dict], keys: list[str], metric: str) -> None:
    from rich.table import Table

    scored = [r for r in results if r["status"].startswith("done") and r["summary"].get(metric) is not None]
    best = METRICS[metric](scored, key=lambda r: r["summary"][metric]) if scored else None
    table = Table(title=f"sweep {out} (best by {metric})")
    for k in keys:
        table.add_column(k)
    for col in ("status", "train_loss", "eval_loss", "best_eval_loss", "steps", "minutes"):
        table.add_column(col)
    for r in results:
        s = r.get("summary", {})
        mark = " ★" if best is r else ""
        table.add_row(*[str(r["params"][k]) for k in keys], r["status"] + mark, str(s.get("train_loss")),
                      str(s.get("eval_loss")), str(s.get("best_eval_loss")), str(s.get("global_step")),
                      f"{s.get('wall_time_s', 0) / 60:.1f}" if s else "")
    show(table)
    if best:
        console.print(f"best trial: [bold]{best['name']}[/bold] ({metric} {best['summary'][metric]})")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = 0
    for r in results:
        curve = _curve(out / r["name"])
        if curve:
            ax.plot(*zip(*curve), "o-", ms=3, label=", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["params"].items()))
            plotted += 1
    if plotted:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("sweep: eval loss per trial")
        fig.savefig(out / "sweep_eval_loss.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_text(out / "sweep_summary.json", json.dumps(
        {"metric": metric, "best": best["name"] if best else None,
         "trials": [{k: v for k, v in r.items()} for r in results]}, indent=2, default=str))
