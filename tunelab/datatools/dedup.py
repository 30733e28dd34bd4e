"""`tunelab data dedup`: exact duplicates (normalised text) and near duplicates (MinHash + LSH).

Near duplicates: each row's text becomes a set of word or character n-grams (shingles); datasketch's
MinHash sketches the set and its MinHashLSH returns the earlier kept rows likely to have a Jaccard
similarity above the threshold. A candidate counts only if the true Jaccard of the two shingle sets
is at or above the threshold (the LSH is a filter; its estimate alone would merge a few distinct rows
and miss a few similar ones near the threshold). The first row of each cluster is kept.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from .common import (
    Provenance,
    add_input_args,
    add_output_args,
    check_inputs_not_outputs,
    example_text,
    fraction,
    guard_outputs,
    load_from_args,
    normalize,
    progress,
    sidecar,
    words,
    write_json,
    write_rows_with_provenance,
)

DEFAULTS = {"threshold": 0.5, "unit": "word", "ngram": 3, "num_perm": 128}


def shingles(text: str, unit: str = "word", n: int = 3) -> set[str]:
    """Word n-grams (a Han/Kana character counts as a word) or character n-grams of normalised text."""
    if unit == "char":
        t = normalize(text)
        return {t[i:i + n] for i in range(max(1, len(t) - n + 1))} if t else set()
    w = words(text)
    if len(w) < n:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class NearDupIndex:
    """Kept texts, searchable for near duplicates. Also used by `stats` and `synth`."""

    def __init__(self, threshold: float = 0.7, unit: str = "word", ngram: int = 3, num_perm: int = 128):
        from datasketch import MinHashLSH

        self.threshold, self.unit, self.ngram, self.num_perm = threshold, unit, ngram, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.sets: dict[int, set[str]] = {}

    def _minhash(self, sh: set[str]):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in sh])
        return m

    def match(self, text: str) -> tuple[int | None, float, set[str], object]:
        """(key of the most similar kept text at or above the threshold or None, its Jaccard, shingles, sketch)."""
        sh = shingles(text, self.unit, self.ngram)
        m = self._minhash(sh)
        best, best_j = None, 0.0
        for key in self.lsh.query(m):
            j = jaccard(sh, self.sets[key])
            if j >= self.threshold and (j > best_j or (j == best_j and key < best)):
                best, best_j = key, j
        return best, best_j, sh, m

    def add(self, key: int, sh: set[str], m) -> None:
        self.lsh.insert(key, m)
        self.sets[key] = sh


@dataclass
class DedupResult:
    keep: list[int]
    """Indices of kept rows (first of each cluster), in file order."""
    clusters: dict[int, list[tuple[int, str, float]]] = field(default_factory=dict)
    """kept index -> [(duplicate index, 'exact' | 'near', similarity)]."""

    @property
    def exact(self) -> int:
        return sum(1 for c in self.clusters.values() for _, k, _ in c if k == "exact")

    @property
    def near(self) -> int:
        return sum(1 for c in self.clusters.values() for _, k, _ in c if k == "near")


def find_duplicates(texts: list[str], threshold: float = 0.7, unit: str = "word", ngram: int = 3,
                    near: bool = True, num_perm: int = 128, on_row=None) -> DedupResult:
    """Exact (normalised) then near duplicates, first of each cluster kept. `texts[i]` None = skip (kept)."""
    exact_first: dict[str, int] = {}
    index = NearDupIndex(threshold, unit, ngram, num_perm) if near else None
    res = DedupResult(keep=[])
    for i, text in enumerate(texts):
        if on_row:
            on_row()
        if text is None:
            res.keep.append(i)
            continue
        key = hashlib.sha1(normalize(text).encode("utf-8")).hexdigest()
        if key in exact_first:
            res.clusters.setdefault(exact_first[key], []).append((i, "exact", 1.0))
            continue
        exact_first[key] = i
        if index is not None:
            match, sim, sh, m = index.match(text)
            if match is not None:
                res.clusters.setdefault(match, []).append((i, "near", round(sim, 4)))
                continue
            index.add(i, sh, m)
        res.keep.append(i)
    return res


def add_parser(sub) -> None:
    p = sub.add_parser("dedup", help="drop exact and near duplicates (MinHash/LSH), keeping the first of each cluster")
    add_input_args(p)
    add_output_args(p)
    p.add_argument("--threshold", type=float, default=DEFAULTS["threshold"],
                   help="Jaccard similarity of shingle sets at or above which rows are near duplicates (0-1]")
    p.add_argument("--unit", choices=["word", "char"], default=DEFAULTS["unit"], help="shingles of words or characters")
    p.add_argument("--ngram", type=int, default=DEFAULTS["ngram"], help="shingle length in units (default 3 words)")
    p.add_argument("--num-perm", type=int, default=DEFAULTS["num_perm"], help="MinHash permutations")
    p.add_argument("--on", choices=["all", "instruction", "response"], default="all",
                   help="compare the whole example, the prompt side only, or the response only")
    p.add_argument("--exact-only", action="store_true", help="only exact (normalised) duplicates")


def check_settings(threshold: float, ngram: int, num_perm: int) -> None:
    fraction(threshold, "--threshold")
    if ngram < 1:
        raise ConfigError(f"--ngram must be >= 1, got {ngram}")
    if num_perm < 16 or num_perm > 1024:
        raise ConfigError(f"--num-perm must be in [16, 1024], got {num_perm}")


def cmd_dedup(args) -> int:
    from ..ui import console

    check_settings(args.threshold, args.ngram, args.num_perm)
    out = Path(args.out)
    report_path = sidecar(out, "clusters")
    guard_outputs([out, report_path, sidecar(out, "provenance")], args.overwrite)
    check_inputs_not_outputs([args.input], out)
    ds = load_from_args(args)
    texts = [example_text(r.example, args.on) if r.example else None for r in ds.rows]
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("dedup", total=len(texts))
        res = find_duplicates(texts, args.threshold, args.unit, args.ngram, not args.exact_only, args.num_perm,
                              on_row=lambda: bar.advance(task))
    seconds = time.perf_counter() - t0
    prov = Provenance("dedup", [args.input], rows_in=len(ds.rows), settings={
        "format": ds.format, "fields": ds.fields, "threshold": args.threshold, "unit": args.unit,
        "ngram": args.ngram, "num_perm": args.num_perm, "on": args.on, "exact_only": args.exact_only})
    if res.exact:
        prov.drop("exact duplicate (normalised text)", res.exact)
    if res.near:
        prov.drop(f"near duplicate (Jaccard >= {args.threshold:g})", res.near)
    prov.extra["clusters"] = len(res.clusters)
    prov.extra["rows_per_second"] = round(len(texts) / max(seconds, 1e-9), 1)
    clusters = [{"kept": ds.rows[k].where, "kept_text": (texts[k] or "")[:200],
                 "duplicates": [{"where": ds.rows[i].where, "kind": kind, "similarity": sim,
                                 "text": (texts[i] or "")[:200]} for i, kind, sim in dups]}
                for k, dups in sorted(res.clusters.items())]
    write_json(report_path, {"input": args.input, "clusters": clusters})
    write_rows_with_provenance(out, [ds.rows[i].raw for i in res.keep], prov)
    console.print(f"dedup {args.input}: {len(ds.rows)} rows, {res.exact} exact and {res.near} near duplicates in "
                  f"{len(res.clusters)} clusters; kept {len(res.keep)} -> {out} "
                  f"({len(texts) / max(seconds, 1e-9):,.0f} "
                  f"rows/s)\n  clusters: {report_path}\n  provenance: {sidecar(out, 'provenance')}")
    return 0
