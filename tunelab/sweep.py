"""`tunelab sweep run.yaml --param train.learning_rate=1e-5,1e-4,5e-4 [--param lora.r=8,16]`

A grid over any config keys, or with `--random N --seed S` N trials drawn at random: a value list is
drawn from, `LO..HI` is a uniform range, `log:LO..HI` log-uniform (learning rates), `int:LO..HI`
integers. Every trial config is validated before the first trial starts; each trial trains in its
own process and run folder (a crash marks that trial failed and the sweep goes on); finished trials
are skipped on a rerun and interrupted ones resume from their checkpoints. A line after each trial
says how many are done and the ETA. The end: one table, one plot of the eval-loss curves, the best
trial by `--metric`: a training number (best_eval_loss, eval_loss, train_loss) or any metric of an
eval task, `eval:TASK:METRIC` (TASK as `tunelab eval --tasks` takes it, e.g.
`eval:examples/demo_task/task.yaml:exact_match` or `eval:ppl:data/val.jsonl:perplexity`), which runs
`tunelab eval` on each finished trial (`--eval-limit N`: its first N items) and keeps its results.json.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .config import ConfigError, load_config
from .fsutil import atomic_write_text
from .ui import console, show

METRICS = {"best_eval_loss": min, "eval_loss": min, "train_loss": min}
EVAL_METRICS = {"multiple_choice": ("acc", "acc_norm"), "generate": ("exact_match",),
                "perplexity": ("loss", "perplexity")}
LOWER_IS_BETTER = ("loss", "perplexity")


def parse_metric(metric: str) -> tuple[str, str] | None:
    """None for a training metric, (task, metric) for `eval:TASK:METRIC`; checked before any trial runs."""
    if metric in METRICS:
        return None
    if not metric.startswith("eval:") or metric.count(":") < 2:
        raise ConfigError(f"--metric {metric!r}: expected one of {', '.join(sorted(METRICS))} or eval:TASK:METRIC "
                          f"(e.g. eval:examples/demo_task/task.yaml:exact_match)")
    task, name = metric[len("eval:"):].rsplit(":", 1)
    from .evaluate.harness import resolve_tasks

    (t,) = resolve_tasks(task) if "," not in task else (None,)
    if t is None:
        raise ConfigError(f"--metric {metric!r}: one task, not several")
    if name not in EVAL_METRICS[t.kind]:
        raise ConfigError(f"--metric {metric!r}: a {t.kind} task reports {', '.join(EVAL_METRICS[t.kind])}, "
                          f"not {name!r}")
    return task, name


def _range(key: str, v: str) -> tuple[str, float, float] | None:
    """`LO..HI`, `log:LO..HI` or `int:LO..HI` as (kind, lo, hi); None for a plain value."""
    kind, _, body = v.partition(":") if v.startswith(("log:", "int:")) else ("uniform", "", v)
    if ".." not in body:
        return None
    lo_s, hi_s = body.split("..", 1)
    try:
        lo, hi = float(lo_s), float(hi_s)
    except ValueError:
        raise ConfigError(f"--param {key}={v}: a range is LO..HI with numbers") from None
    if not lo < hi or (kind == "log" and lo <= 0) or (kind == "int" and not (lo.is_integer() and hi.is_integer())):
        raise ConfigError(f"--param {key}={v}: need LO < HI (log: LO > 0; int: whole numbers)")
    return kind, lo, hi


def random_trials(grid: list[tuple[str, list[str]]], n: int, seed: int) -> list[dict[str, str]]:
    """`n` assignments drawn with random.Random(seed): one value of each list, or a number in each range."""
    rng = random.Random(seed)
    specs = [(k, [_range(k, v) for v in vals], vals) for k, vals in grid]
    out = []
    for _ in range(n):
        combo = {}
        for key, ranges, vals in specs:
            if len(vals) == 1 and ranges[0] is not None:
                kind, lo, hi = ranges[0]
                x = (rng.randint(int(lo), int(hi)) if kind == "int" else
                     math.exp(rng.uniform(math.log(lo), math.log(hi))) if kind == "log" else rng.uniform(lo, hi))
                combo[key] = str(x) if kind == "int" else f"{x:.3g}"
            elif any(r is not None for r in ranges):
                raise ConfigError(f"--param {key}: a range stands alone (KEY=LO..HI), not in a list")
            else:
                combo[key] = rng.choice(vals)
        out.append(combo)
    return out


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
    p = sub.add_parser("sweep", help="grid or random sweep over config keys, one run folder per trial")
    p.add_argument("config")
    p.add_argument("--param", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="a config key and its values (repeat for a grid over several keys); with --random also "
                        "LO..HI, log:LO..HI or int:LO..HI")
    p.add_argument("--random", type=int, metavar="N", help="random search: N trials drawn from the --param values")
    p.add_argument("--seed", type=int, default=0, help="random search seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed overrides for every trial")
    p.add_argument("--output", "-o", help="sweep folder (default: runs/<config>-sweep)")
    p.add_argument("--metric", default="best_eval_loss",
                   help=f"what picks the best trial: {', '.join(sorted(METRICS))} (lowest wins), or eval:TASK:METRIC "
                        f"(e.g. eval:examples/demo_task/task.yaml:exact_match; loss/perplexity lowest, others highest)")
    p.add_argument("--eval-limit", type=int, help="with --metric eval:...: the task's first N items")
    p.add_argument("--workers", type=int, default=1, help="trials run in parallel processes")


def _curve(trial: Path) -> list[tuple[int, float]]:
    from .rundir import newest_checkpoint

    last = newest_checkpoint(trial)
    if last is None:
        return []
    hist = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]


def cmd_sweep(args) -> int:
    grid = parse_params(args.param)
    keys = [k for k, _ in grid]
    if args.workers <= 0:
        raise ConfigError(f"--workers must be > 0, got {args.workers}")
    if args.random is not None:
        if args.random <= 0:
            raise ConfigError(f"--random must be > 0, got {args.random}")
        combos = random_trials(grid, args.random, args.seed)
    else:
        ranged = [f"{k}={v}" for k, vals in grid for v in vals if _range(k, v) is not None]
        if ranged:
            raise ConfigError(f"--param {ranged[0]}: a range needs --random N (a grid takes value lists)")
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*[v for _, v in grid])]
    if args.eval_limit is not None and args.eval_limit <= 0:
        raise ConfigError(f"--eval-limit must be > 0, got {args.eval_limit}")
    eval_metric = parse_metric(args.metric)
    # Validate every trial before anything runs.
    problems = []
    for combo in combos:
        try:
            load_config(args.config, list(args.overrides) + [f"{k}={v}" for k, v in combo.items()])
        except ConfigError as e:
            problems.append(f"{', '.join(f'{k}={v}' for k, v in combo.items())}: {e}")
    if problems:
        raise ConfigError(f"{len(problems)} of {len(combos)} trials are invalid, nothing was run: "
                          + " | ".join(problems))
    out = Path(args.output) if args.output else Path("runs") / f"{Path(args.config).stem}-sweep"
    out.mkdir(parents=True, exist_ok=True)
    trials = [{"name": trial_name(i, c), "params": c} for i, c in enumerate(combos)]
    atomic_write_text(out / "sweep.json", json.dumps({"config": str(args.config), "overrides": args.overrides,
                                                     "grid": grid, "random": args.random, "seed": args.seed,
                                                     "metric": args.metric, "trials": trials}, indent=2))
    threads = max(1, (os.cpu_count() or 1) // args.workers)

    clock = _Clock(len(trials), args.workers)

    def run_trial(t: dict) -> dict:
        started = time.monotonic()
        r = train_trial(t)
        if r["status"].startswith("done") and eval_metric is not None:
            r = eval_trial(r, out / t["name"], *eval_metric, args.eval_limit, env_threads=threads)
        clock.finished(r, time.monotonic() - started)
        return r

    def train_trial(t: dict) -> dict:
        folder = out / t["name"]
        summary = folder / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
            return {**t, "status": "done (kept)", "summary": json.loads(summary.read_text()), "kept": True}
        cmd = [sys.executable, "-m", "tunelab", "train", str(args.config), "--output", str(folder), "--resume"]
        for s in list(args.overrides) + [f"{k}={v}" for k, v in t["params"].items()]:
            cmd += ["--set", s]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        console.print(f"[bold]{t['name']}[/bold] started")
        with (out / f"{t['name']}.log").open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0 or not summary.is_file():
            log_lines = (out / f"{t['name']}.log").read_text(errors="replace").splitlines()
            last = [line for line in log_lines if line.strip()]
            reason = last[-1] if last else f"exit code {rc}"
            console.print(f"[red]{t['name']} failed[/red]: {reason}")
            return {**t, "status": "failed", "reason": reason}
        console.print(f"[green]{t['name']} done[/green]")
        return {**t, "status": "done", "summary": json.loads(summary.read_text())}

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run_trial, trials))
    finish(out, results, keys, args.metric)
    return 0 if any(r["status"].startswith("done") for r in results) else 2


class _Clock:
    """The line after each trial: done/total, failed, elapsed and the ETA (mean wall time of the trials this
    run trained, spread over the workers; kept trials cost nothing)."""

    def __init__(self, total: int, workers: int):
        self.total, self.workers, self.t0 = total, workers, time.monotonic()
        self.done = self.failed = self.trained = 0
        self.seconds = 0.0
        self.lock = threading.Lock()

    def finished(self, r: dict, seconds: float) -> None:
        from .ui import clock

        with self.lock:
            self.done += 1
            self.failed += r["status"] == "failed"
            if not r.get("kept"):
                self.trained += 1
                self.seconds += seconds
            left = self.total - self.done
            eta = ("0:00:00" if left == 0 else clock(self.seconds / self.trained * left / min(self.workers, left))
                   if self.trained else "?")
            console.print(f"sweep: {self.done}/{self.total} trials ({self.failed} failed), elapsed "
                          f"{clock(time.monotonic() - self.t0)}, eta {eta}", markup=False)


def eval_trial(r: dict, folder: Path, task: str, metric: str, limit: int | None, env_threads: int) -> dict:
    """`tunelab eval` on a finished trial; its results.json stays in the trial folder (reused on a rerun)."""
    key = hashlib.sha256(json.dumps([task, limit]).encode()).hexdigest()[:8]
    res = folder / f"eval-{key}" / "results.json"
    if not res.is_file():
        cmd = [sys.executable, "-m", "tunelab", "eval", str(folder), "--tasks", task, "--out", str(res.parent)]
        if limit:
            cmd += ["--limit", str(limit)]
        env = dict(os.environ, OMP_NUM_THREADS=str(env_threads), TOKENIZERS_PARALLELISM="false")
        with (folder.parent / f"{r['name']}.eval.log").open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0 or not res.is_file():
            console.print(f"[red]{r['name']}: eval failed[/red] (see {folder.parent / (r['name'] + '.eval.log')})")
            return {**r, "status": "done, eval failed"}
    data = json.loads(res.read_text())
    (per_task,) = data["models"].values()
    (scores,) = per_task.values()
    value, lo, hi = scores["metrics"][metric]
    console.print(f"{r['name']}: {metric} {value:.4g} [{lo:.4g}, {hi:.4g}]", markup=False)
    return {**r, "summary": {**r["summary"], f"eval:{task}:{metric}": value}, "eval_ci": [lo, hi]}


def finish(out: Path, results: list[dict], keys: list[str], metric: str) -> None:
    from rich.table import Table

    scored = [r for r in results if r["status"].startswith("done") and r["summary"].get(metric) is not None]
    pick = METRICS.get(metric) or (min if metric.rsplit(":", 1)[-1] in LOWER_IS_BETTER else max)
    best = pick(scored, key=lambda r: r["summary"][metric]) if scored else None
    table = Table(title=f"sweep {out} (best by {metric})")
    for k in keys:
        table.add_column(k)
    extra = [metric] if metric not in METRICS else []
    for col in ("status", "train_loss", "eval_loss", "best_eval_loss", *extra, "steps", "minutes"):
        table.add_column(col)
    for r in results:
        s = r.get("summary", {})
        mark = " ★" if best is r else ""
        table.add_row(*[str(r["params"][k]) for k in keys], r["status"] + mark, str(s.get("train_loss")),
                      str(s.get("eval_loss")), str(s.get("best_eval_loss")), *[str(s.get(m)) for m in extra],
                      str(s.get("global_step")),
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
            ax.plot(*zip(*curve), "o-", ms=3,
                    label=", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["params"].items()))
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
