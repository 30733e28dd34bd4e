"""`tunelab data stats`: what a data file holds, read exactly as `train` reads it.

Rows and the ones `train` would drop (and why), fields and how often each is empty, the script mix
(Latin/Hangul/Han/...: script detection, not language identification), lengths (tokens with the
run's tokenizer and template when --config is given, else characters), exact and near duplicates
(dedup's method), the longest and shortest examples, and a histogram PNG of the lengths.
"""

from __future__ import annotations

from pathlib import Path

from ..data.pipeline import percentiles
from .common import (
    add_input_args,
    example_text,
    guard_outputs,
    load_from_args,
    main_script,
    progress,
    reading_options,
    write_json,
)
from .dedup import DEFAULTS, check_settings, find_duplicates


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="rows, fields, empty fields, script mix, token lengths, duplicates, histogram")
    add_input_args(p)
    p.add_argument("--png", help="write a histogram of the lengths to this PNG file")
    p.add_argument("--json", help="write the statistics to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --png / --json if they exist")
    p.add_argument("--threshold", type=float, default=DEFAULTS["threshold"], help="near-duplicate Jaccard threshold")
    p.add_argument("--show", type=int, default=3, help="longest and shortest examples to show")


def _empty(value) -> bool:
    return (value is None or (isinstance(value, str) and not value.strip())
            or (isinstance(value, (list, dict)) and not value))


def compute_stats(ds, tokenizer=None, template: str = "alpaca", system_prompt: str | None = None,
                  threshold: float = DEFAULTS["threshold"]) -> dict:
    rows = ds.rows
    usable = [r for r in rows if r.example is not None]
    fields: dict[str, dict[str, int]] = {}
    for r in rows:
        for k, v in r.raw.items():
            f = fields.setdefault(k, {"present": 0, "empty": 0})
            f["present"] += 1
            f["empty"] += _empty(v)
    for f in fields.values():
        f["missing"] = len(rows) - f["present"]
    dropped: dict[str, int] = {}
    for r in rows:
        if r.example is None:
            dropped[r.problem] = dropped.get(r.problem, 0) + 1
    scripts: dict[str, int] = {}
    texts = [example_text(r.example) for r in usable]
    for t in texts:
        s = main_script(t)
        scripts[s] = scripts.get(s, 0) + 1

    unit = "characters"
    if tokenizer is not None:
        from ..data.pipeline import tokenize_example

        unit = "tokens"
        lengths = []
        with progress() as bar:
            task = bar.add_task("tokenize", total=len(usable))
            for r in usable:
                lengths.append(tokenize_example(tokenizer, template, r.example, 10 ** 9, system_prompt).full_len)
                bar.advance(task)
    else:
        lengths = [len(t) for t in texts]
    with progress() as bar:
        task = bar.add_task("duplicates", total=len(texts))
        dup = find_duplicates(texts, threshold=threshold, on_row=lambda: bar.advance(task))
    order = sorted(range(len(usable)), key=lambda i: lengths[i])
    return {
        "file": ds.path, "format": ds.format, "fields_map": ds.fields,
        "rows": len(rows), "usable_rows": len(usable), "dropped_by_train": dropped,
        "fields": fields,
        "scripts": dict(sorted(scripts.items(), key=lambda kv: -kv[1])),
        "length_unit": unit,
        "lengths": percentiles(lengths) | ({"mean": round(sum(lengths) / len(lengths), 1)} if lengths else {}),
        "duplicates": {"exact": dup.exact, "near": dup.near, "threshold": threshold, "clusters": len(dup.clusters)},
        "longest": [{"where": usable[i].where, "length": lengths[i], "text": texts[i][:160]} for i in order[::-1][:5]],
        "shortest": [{"where": usable[i].where, "length": lengths[i], "text": texts[i][:160]} for i in order[:5]],
        "_lengths": lengths,
    }


def histogram(lengths: list[int], unit: str, title: str, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4c72b0")
    ax.set_xlabel(f"example length ({unit})")
    ax.set_ylabel("rows")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write_bytes(path, buf.getvalue())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """fsutil.atomic_write_text for bytes (temporary sibling, fsync, rename)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_stats(args) -> int:
    from rich.table import Table

    from ..ui import console

    check_settings(args.threshold, 3, 128)
    outs = [Path(p) for p in (args.png, args.json) if p]
    guard_outputs(outs, args.overwrite)
    ds = load_from_args(args)
    fmt, fields, split, cfg = reading_options(args)
    tok = None
    template, system_prompt = "alpaca", None
    if cfg is not None:
        from ..models import load_tokenizer, resolve_model

        tok, _ = load_tokenizer(resolve_model(cfg.model.name, cfg.model.revision), cfg.model.pad_token)
        template, system_prompt = cfg.data.template, cfg.data.system_prompt
    st = compute_stats(ds, tok, template, system_prompt, args.threshold)
    lengths = st.pop("_lengths")

    t = Table(title=f"tunelab data stats {args.input}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("rows", f"{st['rows']} read, {st['usable_rows']} usable by train (format {ds.format})")
    for reason, n in st["dropped_by_train"].items():
        t.add_row("  dropped", f"{n}: {reason}")
    t.add_row("fields", ", ".join(f"{k} (empty {v['empty']}"
                                  + (f", missing {v['missing']}" if v["missing"] else "") + ")"
                                  for k, v in st["fields"].items()))
    total = max(1, st["usable_rows"])
    t.add_row("scripts", ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in st["scripts"].items()))
    t.add_row("lengths", ", ".join(f"{k} {v}" for k, v in st["lengths"].items()) + f" {st['length_unit']}"
              + ("" if tok is not None else " (give --config run.yaml for tokens)"))
    d = st["duplicates"]
    t.add_row("duplicates", f"{d['exact']} exact, {d['near']} near (Jaccard >= {d['threshold']:g}) "
                            f"in {d['clusters']} clusters")
    for label in ("longest", "shortest"):
        for e in st[label][: args.show]:
            t.add_row(f"  {label}", f"{e['length']} {st['length_unit']} {e['where']}: {e['text'][:100]!r}")
    console.print(t)
    if args.png and lengths:
        histogram(lengths, st["length_unit"], f"{str(args.input)[-60:]}: {len(lengths)} rows", Path(args.png))
        console.print(f"histogram: {args.png}")
    if args.json:
        write_json(Path(args.json), st)
        console.print(f"statistics: {args.json}")
    return 0
