"""Mixing several data files: `data.sources` in a run, and `tunelab data mix` to write the mix out.

    data:
      sources:
        - {path: alpaca.json, weight: 3}
        - {path: chatbot.csv, fields: {instruction: Q, output: A}, weight: 1}

Each source is read with its own format, field map and split (defaults: the run's data.format,
data.fields, data.split). With `weight`s the sources are interleaved by `datasets.interleave_datasets`
with those probabilities and data.seed, stopping when one source runs out (its "first_exhausted"
strategy), so the mix is reproducible and has the asked proportions. With `rows` each source gives
exactly that many rows, drawn without replacement in a data.seed shuffle (repeated whole passes when a
source has fewer rows: oversampling). Rows a source had but the mix did not draw are counted as dropped.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from ..config import ConfigError

SOURCE_KEYS = {"path", "format", "fields", "split", "weight", "rows"}


def validate_sources(sources: list) -> str | None:
    """The first problem with data.sources as a message, or None."""
    from ..config import CHOICES, DATA_FIELDS

    if not isinstance(sources, list):
        return "data.sources must be a list of {path, weight or rows, format?, fields?, split?}"
    kinds = set()
    for n, s in enumerate(sources, 1):
        if not isinstance(s, dict):
            return f"data.sources item {n} must be a mapping with a path"
        unknown = set(s) - SOURCE_KEYS
        if unknown:
            return (f"data.sources item {n}: unknown key '{sorted(unknown)[0]}' "
                    f"(known: {', '.join(sorted(SOURCE_KEYS))})")
        if not isinstance(s.get("path"), str) or not s["path"]:
            return f"data.sources item {n}: path is required"
        if "format" in s and s["format"] not in CHOICES["data.format"]:
            return f"data.sources item {n}: format must be one of {', '.join(CHOICES['data.format'])}"
        fields = s.get("fields", {})
        if not isinstance(fields, dict) or any(k not in DATA_FIELDS or not isinstance(v, str)
                                               for k, v in fields.items()):
            return f"data.sources item {n}: fields must map {', '.join(DATA_FIELDS)} to column names"
        if ("weight" in s) == ("rows" in s):
            return f"data.sources item {n}: give either weight or rows"
        if "weight" in s:
            w = s["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
                return f"data.sources item {n}: weight must be a number > 0, got {w!r}"
            kinds.add("weight")
        else:
            r = s["rows"]
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                return f"data.sources item {n}: rows must be an integer >= 1, got {r!r}"
            kinds.add("rows")
    if len(kinds) > 1:
        return "data.sources: give every source a weight, or every source a rows count, not a mix of both"
    if not sources:
        return "data.sources is empty"
    return None


def source_config(cfg, s: dict):
    """The run's DataConfig with this source's path, format, fields and split."""
    return dataclasses.replace(cfg, path=s["path"], format=s.get("format", cfg.format),
                               fields=dict(s.get("fields", cfg.fields)), split=s.get("split", cfg.split), sources=[])


def mix_sources(cfg, stats, base: Path | None = None) -> list:
    """(where, Example) pairs of the mix, in mix order; stats gets rows read, drops and `mix` (rows per source)."""
    import datasets

    from ..data.pipeline import load_examples
    from ..data.templates import Example

    per_source = []
    for s in cfg.sources:
        scfg = source_config(cfg, s)
        per_source.append(load_examples(scfg, scfg.path, stats, base))
    for s, pairs in zip(cfg.sources, per_source):
        if not pairs:
            raise ConfigError(f"data.sources: {s['path']} has no usable rows")
    picked: list[list[int]] = []
    if "rows" in cfg.sources[0]:
        for s, pairs in zip(cfg.sources, per_source):
            rng = random.Random(f"{cfg.seed}:{s['path']}")
            order: list[int] = []
            while len(order) < s["rows"]:
                passes = list(range(len(pairs)))
                rng.shuffle(passes)
                order += passes
            picked.append(order[: s["rows"]])
        mixed = [(k, i) for k, idx in enumerate(picked) for i in idx]
        random.Random(cfg.seed).shuffle(mixed)
    else:
        total = sum(s["weight"] for s in cfg.sources)
        tables = [datasets.Dataset.from_dict({"src": [k] * len(p), "i": list(range(len(p)))})
                  for k, p in enumerate(per_source)]
        inter = datasets.interleave_datasets(tables, probabilities=[s["weight"] / total for s in cfg.sources],
                                             seed=cfg.seed, stopping_strategy="first_exhausted")
        mixed = list(zip(inter["src"], inter["i"]))
        picked = [[i for src, i in mixed if src == k] for k in range(len(per_source))]
    for k, (s, pairs) in enumerate(zip(cfg.sources, per_source)):
        used = set(picked[k])
        for i, (where, _) in enumerate(pairs):
            if i not in used:
                stats.drop("not drawn by the mix (data.sources)", where)
    stats.mix = {s["path"]: len(picked[k]) for k, s in enumerate(cfg.sources)}
    out = []
    for src, i in mixed:
        where, ex = per_source[src][i]
        out.append((where, Example(**dataclasses.asdict(ex))))
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("mix", help="write the mix of a run's data.sources (weights or row counts, by data.seed)")
    p.add_argument("config", help="run YAML with data.sources")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", "-o", required=True, help="output .jsonl (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")


def cmd_mix(args) -> int:
    from ..config import load_config
    from ..data.pipeline import DataStats
    from ..ui import console
    from .common import Provenance, guard_outputs, sidecar, write_rows_with_provenance

    cfg, _ = load_config(args.config, args.overrides)
    if not cfg.data.sources:
        raise ConfigError(f"{args.config}: no data.sources to mix")
    out = Path(args.out)
    guard_outputs([out, sidecar(out, "provenance")], args.overwrite)
    stats = DataStats()
    pairs = mix_sources(cfg.data, stats, Path(args.config).resolve().parent)
    chat = any(ex.messages is not None for _, ex in pairs)
    rows = []
    for _, ex in pairs:  # one canonical format for the mixed file: alpaca, or chat if any source is chat
        if chat:
            msgs = list(ex.messages
                        or [{"role": "user", "content": ex.instruction + (f"\n\n{ex.input}" if ex.input else "")}])
            rows.append({"messages": msgs + [{"role": "assistant", "content": ex.response}]})
        else:
            rows.append({"instruction": ex.instruction, "input": ex.input, "output": ex.response})
    prov = Provenance("mix", [s["path"] if Path(s["path"]).exists()
                              else str(Path(args.config).resolve().parent / s["path"])
                              for s in cfg.data.sources] + [args.config], rows_in=stats.rows_read,
                      settings={"sources": cfg.data.sources, "seed": cfg.data.seed,
                                "format": "chat" if chat else "alpaca"})
    for reason, n in stats.dropped.items():
        prov.drop(reason, n)
    prov.extra["mix"] = stats.mix
    write_rows_with_provenance(out, rows, prov)
    console.print(f"mix: {len(rows)} rows -> {out} (" + ", ".join(f"{k} {v}" for k, v in stats.mix.items()) + ")")
    return 0


def describe(stats) -> str | None:
    """`check`'s line for the final mix."""
    mix = getattr(stats, "mix", None)
    if not mix:
        return None
    total = max(1, sum(mix.values()))
    return ", ".join(f"{Path(k).name} {v} ({100 * v / total:.1f}%)" for k, v in mix.items())

