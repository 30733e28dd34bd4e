"""`tunelab report DIR...`: one self-contained HTML page and a Markdown file.

DIR may be a run folder (loss curves from its TensorBoard logs, the run summary), an eval folder
(results.json: benchmark table with CIs, a bar chart), or a compare folder (side-by-side answers,
judge and blind win rates). Plots are matplotlib PNGs, embedded in the HTML as data URIs.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ..config import ConfigError
from ..fsutil import atomic_dir
from ..ui import console


class ReportError(ConfigError):
    pass


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for f in sorted((run / "tensorboard").glob("events.out.tfevents.*")):  # one file per (re)start
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                series.setdefault(tag, {})[e.step] = e.value  # a resumed run overwrites repeated steps
    return {k: sorted(v.items()) for k, v in series.items()}


class Section:
    def __init__(self, title: str):
        self.title, self.html, self.md, self.images = title, [], [], []

    def image(self, fig, name: str, alt: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        _plt().close(fig)
        data = buf.getvalue()
        self.images.append((name, data))
        self.html.append(f'<img alt="{html.escape(alt)}" '
                         f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')
        self.md.append(f"![{alt}]({name})")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
        b = "".join("<tr>" + "".join(f"<td>{html.escape(str(c)).replace(chr(10), '<br>')}</td>" for c in r) + "</tr>"
                    for r in rows)
        self.html.append(f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>")
        def esc(c) -> str:
            return str(c).replace("|", "\\|").replace("\n", "<br>")

        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.md.append("\n".join(lines + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]))

    def text(self, s: str) -> None:
        self.html.append(f"<p>{html.escape(s)}</p>")
        self.md.append(s)


def run_section(run: Path) -> Section:
    s = Section(f"Run {run.name}")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    if summary:
        keys = ["status", "method", "model", "device", "compute_dtype", "global_step", "input_tokens_seen",
                "train_loss", "first_eval_step", "first_eval_loss", "eval_loss", "best_eval_loss", "best_eval_step",
                "wall_time_s", "peak_rss_gib"]
        s.table(["", "value"], [[k, summary.get(k)] for k in keys if k in summary])
        if summary.get("overfitting_warning"):
            s.text("Warning: " + summary["overfitting_warning"])
    sc = read_scalars(run) if (run / "tensorboard").is_dir() else {}
    if "train/loss" in sc:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 3.6))
        ax.plot(*zip(*sc["train/loss"]), label="train loss", lw=1)
        if "eval/loss" in sc:
            ax.plot(*zip(*sc["eval/loss"]), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{run.name}: loss")
        s.image(fig, f"{run.name}_loss.png", "train and eval loss")
    else:
        s.text("No TensorBoard loss scalars found.")
    return s


def eval_section(folder: Path) -> Section:
    r = json.loads((folder / "results.json").read_text())
    s = Section(f"Benchmarks ({folder.name})")
    models = list(r["models"])
    header = ["task", "metric"] + [Path(m).name or m for m in models]
    rows = []
    for task, info in r["tasks"].items():
        for metric, v in r["models"][models[0]][task]["metrics"].items():
            pct = metric not in ("loss", "perplexity")
            f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
            row = [f"{task} (n={info['items']}, {info['fewshot']}-shot)", metric]
            for m in models:
                mv = r["models"][m][task]["metrics"][metric]
                cell = f"{f(mv[0])} [{f(mv[1])}, {f(mv[2])}]"
                d = r.get("diffs", {}).get(m, {}).get(task)
                if d and d["metric"] == metric:
                    cell += f"\nΔ {f(d['diff'][0])} [{f(d['diff'][1])}, {f(d['diff'][2])}]"
                row.append(cell)
            rows.append(row)
    s.table(header, rows)
    plt = _plt()
    tasks = [t for t, i in r["tasks"].items() if i["kind"] != "perplexity"]
    if tasks:
        import numpy as np

        fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) * len(models) / 2 + 3), 3.6))
        width = 0.8 / len(models)
        for j, m in enumerate(models):
            vals = [r["models"][m][t]["metrics"]["acc" if "acc" in r["models"][m][t]["metrics"] else "exact_match"]
                    for t in tasks]
            mid = np.array([v[0] for v in vals]) * 100
            err = np.array([[v[0] - v[1], v[2] - v[0]] for v in vals]).T * 100
            ax.bar(np.arange(len(tasks)) + j * width, mid, width, yerr=err, capsize=3, label=Path(m).name or m)
        ax.set_xticks(np.arange(len(tasks)) + width * (len(models) - 1) / 2, tasks, rotation=20)
        ax.set_ylabel("accuracy / exact match (%)")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        ax.set_title("scores with 95% bootstrap CI")
        s.image(fig, f"{folder.name}_bench.png", "benchmark scores with confidence intervals")
    return s


def compare_section(folder: Path) -> Section:
    from .compare import load_pairs

    meta, rows = load_pairs(folder)
    s = Section(f"A vs B ({folder.name})")
    s.text(f"A = {meta.get('a', 'A')}; B = {meta.get('b', 'B')}")
    bars = []
    for name, label in (("judge_pairwise.json", "LLM judge"), ("blind.json", "blind A/B")):
        f = folder / name
        if f.is_file():
            j = json.loads(f.read_text())
            if "b_win_rate" in j:
                bars.append((f"{label}: B win rate", j["b_win_rate"]))
                if "lc_win_rate" in j:
                    bars.append((f"{label}: length-controlled", j["lc_win_rate"]))
                s.text(f"{label}: B better {j['b_wins']}, A better {j['a_wins']}, ties {j['ties']}"
                       + (f", errors {j['errors']}" if "errors" in j else ""))
    if bars:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 0.6 * len(bars) + 1.2))
        for i, (lab, (v, lo, hi)) in enumerate(bars):
            ax.barh(i, 100 * v, xerr=[[100 * (v - lo)], [100 * (hi - v)]], capsize=4, color="tab:blue")
        ax.axvline(50, color="grey", ls="--", lw=1)
        ax.set_yticks(range(len(bars)), [b[0] for b in bars])
        ax.set_xlim(0, 100)
        ax.set_xlabel("B's win rate over A (%), 95% CI")
        s.image(fig, f"{folder.name}_winrate.png", "win rates with confidence intervals")
    s.table(["#", "prompt", "A", "B"], [[r["index"], r["prompt"], r["a"], r["b"]] for r in rows[:20]])
    return s


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0;width:100%}td,th{border:1px solid #ccc;padding:4px 8px;"
       "vertical-align:top;text-align:left;font-size:14px}th{background:#f3f3f3}img{max-width:100%;margin:1em 0}"
       "h2{border-bottom:2px solid #ddd;padding-bottom:4px}")


def build(dirs: list[Path]) -> list[Section]:
    sections = []
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d}: not a folder")
        found = False
        if (d / "summary.json").is_file() or (d / "tensorboard").is_dir():
            sections.append(run_section(d))
            found = True
        if (d / "results.json").is_file():
            sections.append(eval_section(d))
            found = True
        if (d / "compare.jsonl").is_file():
            sections.append(compare_section(d))
            found = True
        if not found:
            raise ReportError(f"{d}: neither a run folder (summary.json, tensorboard/), an eval folder (results.json) "
                              f"nor a compare folder (compare.jsonl)")
    return sections


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="HTML + Markdown report of run, eval and compare folders")
    p.add_argument("dirs", nargs="+", help="run folders, eval --out folders, compare folders")
    p.add_argument("--out", help="report folder (default: <first dir>/report)")


def cmd_report(args) -> int:
    dirs = [Path(d) for d in args.dirs]
    sections = build(dirs)
    out = Path(args.out) if args.out else dirs[0] / "report"
    body = "".join(f"<h2>{html.escape(s.title)}</h2>" + "".join(s.html) for s in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tunelab report</title><style>{CSS}</style>"
            f"</head><body><h1>tunelab report</h1>{body}</body></html>")
    md = "# tunelab report\n\n" + "\n".join(f"## {s.title}\n\n" + "\n\n".join(s.md) + "\n" for s in sections)
    with atomic_dir(out) as tmp:
        (tmp / "report.html").write_text(page, encoding="utf-8")
        (tmp / "report.md").write_text(md, encoding="utf-8")
        for s in sections:
            for name, data in s.images:
                (tmp / name).write_bytes(data)
    console.print(f"report: {out / 'report.html'} and {out / 'report.md'}")
    return 0
