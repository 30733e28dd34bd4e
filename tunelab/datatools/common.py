"""What every `tunelab data` command shares: reading rows the way `train` does, text normalisation,
the never-overwrite output rule, atomic writes, the provenance sidecar and a progress bar.

Rows are read with tunelab.data.sources.read_rows and turned into examples with
tunelab.data.formats.to_example, the same two calls `train` makes, with the same `format` and field
map (from flags or from a run's `data:` section). Outputs are the original rows (the user's own
column names), so the file a command writes is read by `train` with the same config.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..data.formats import FORMAT_FIELDS, RowError, to_example
from ..data.sources import DataError, read_rows
from ..data.templates import Example
from ..fsutil import atomic_write_text

STRUCTURAL = ("missing field", "field '", "each message", "the last message")
"""RowError messages that mean the field map is wrong (train refuses the file), not one bad row."""


# ---- reading ----------------------------------------------------------------------------------

@dataclass
class Row:
    where: str
    """file:line of the row, for reports and errors."""
    raw: dict
    """The row as read (without tunelab's `__line__`): what outputs write back."""
    example: Example | None
    """None when the row is one `train` would drop (empty response/instruction)."""
    problem: str = ""


@dataclass
class Dataset:
    path: str
    format: str
    fields: dict[str, str]
    rows: list[Row]

    @property
    def usable(self) -> list[Row]:
        return [r for r in self.rows if r.example is not None]


def add_input_args(p, multiple: bool = False) -> None:
    """FILE plus the run's way of reading it: --config run.yaml (its data.format/fields/split) or flags."""
    if multiple:
        p.add_argument("inputs", nargs="+", metavar="FILE",
                       help="data file(s): .jsonl/.json/.csv/.parquet or a saved datasets folder")
    else:
        p.add_argument("input", metavar="FILE", help="data file: .jsonl/.json/.csv/.parquet or a saved datasets folder")
    p.add_argument("--config", help="run YAML: read the file with its data.format, data.fields and data.split")
    p.add_argument("--format", choices=sorted(FORMAT_FIELDS), help="row format (default: the run's, else alpaca)")
    p.add_argument("--field", action="append", default=[], metavar="NAME=COLUMN",
                   help="map a tunelab field to a column, e.g. --field instruction=Q (repeatable)")
    p.add_argument("--split", help="split of a saved datasets folder (default: train)")


def add_output_args(p, required: bool = True) -> None:
    p.add_argument("--out", "-o", required=required, help="output .jsonl (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its sidecar files) if they exist")


def reading_options(args) -> tuple[str, dict[str, str], str, Any]:
    """(format, fields, split, run config or None) from --config and the flags (flags win)."""
    cfg = None
    fmt, fields, split = "alpaca", {}, "train"
    if getattr(args, "config", None):
        from ..config import load_config

        cfg, _ = load_config(args.config, [])
        fmt, fields, split = cfg.data.format, dict(cfg.data.fields), cfg.data.split
    if getattr(args, "format", None):
        fmt = args.format
    for pair in getattr(args, "field", None) or []:
        name, sep, column = pair.partition("=")
        if not sep or not name or not column:
            raise ConfigError(f"--field: expected NAME=COLUMN, got '{pair}'")
        from ..config import DATA_FIELDS

        if name not in DATA_FIELDS:
            raise ConfigError(f"--field {pair}: unknown field '{name}' (known: {', '.join(DATA_FIELDS)})")
        fields[name] = column
    if getattr(args, "split", None):
        split = args.split
    return fmt, fields, split, cfg


def load_dataset(path: str, fmt: str = "alpaca", fields: dict[str, str] | None = None, split: str = "train",
                 base: Path | None = None) -> Dataset:
    """Every row of `path`, converted as `train` converts it. A wrong field map is a DataError (as in
    train); a row train would drop (empty response, ...) is kept with `example=None` and its reason."""
    fields = fields or {}
    raw_rows = read_rows(path, split, base)
    rows: list[Row] = []
    for raw in raw_rows:
        line = raw.pop("__line__", "?")
        where = f"{path}:{line}"
        try:
            ex = to_example(raw, fmt, fields)
        except RowError as e:
            reason = str(e)
            if reason.startswith(STRUCTURAL):
                columns = ", ".join(sorted(raw))
                raise DataError(f"{where}: {reason}; format {fmt} expects {', '.join(FORMAT_FIELDS[fmt])} "
                                f"(the file has: {columns}; map names with --field NAME=COLUMN)") from None
            rows.append(Row(where, raw, None, reason))
            continue
        rows.append(Row(where, raw, ex))
    return Dataset(path, fmt, fields, rows)


def load_from_args(args, path: str | None = None) -> Dataset:
    fmt, fields, split, cfg = reading_options(args)
    base = Path(args.config).resolve().parent if getattr(args, "config", None) else None
    return load_dataset(path or args.input, fmt, fields, split, base)


# ---- text -------------------------------------------------------------------------------------

def example_text(ex: Example, part: str = "all") -> str:
    """The text of an example: `instruction` (prompt side, with input and earlier turns), `response`, or `all`."""
    prompt = "\n".join([m["content"] for m in ex.messages or []] + [ex.instruction, ex.input]).strip()
    if part == "instruction":
        return prompt
    if part == "response":
        return ex.response
    return (prompt + "\n" + ex.response).strip()


_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation dropped, whitespace collapsed: the key for exact duplicates."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


# A "word" is a run of letters/digits, except that each Han/Kana character is a word of its own
# (Chinese and Japanese put no spaces between words; per-character grams are the usual stand-in).
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
                   r"|[^\W_\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+",
                   re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


# ---- scripts (language mix) ---------------------------------------------------------------------

_SCRIPTS = [
    ("Hangul", ((0xAC00, 0xD7AF), (0x1100, 0x11FF), (0x3130, 0x318F))),
    ("Han", ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF))),
    ("Kana", ((0x3040, 0x30FF),)),
    ("Cyrillic", ((0x0400, 0x04FF),)),
    ("Arabic", ((0x0600, 0x06FF),)),
    ("Greek", ((0x0370, 0x03FF),)),
    ("Devanagari", ((0x0900, 0x097F),)),
    ("Thai", ((0x0E00, 0x0E7F),)),
    ("Hebrew", ((0x0590, 0x05FF),)),
]
SCRIPT_NAMES = ["Latin"] + [n for n, _ in _SCRIPTS] + ["Other"]


def char_script(c: str) -> str | None:
    if not c.isalpha():
        return None
    o = ord(c)
    if o < 0x250 or 0x1E00 <= o <= 0x1EFF:
        return "Latin"
    for name, ranges in _SCRIPTS:
        if any(lo <= o <= hi for lo, hi in ranges):
            return name
    return "Other"


def script_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in text:
        s = char_script(c)
        if s:
            counts[s] = counts.get(s, 0) + 1
    return counts


def main_script(text: str) -> str:
    """The script most letters are in ('none' for text without letters). Script detection, not language ID."""
    counts = script_counts(text)
    if not counts:
        return "none"
    # Japanese mixes Han and Kana; Korean may mix Hanja into Hangul: the distinctive script wins.
    return max(counts, key=lambda s: counts[s])


# ---- outputs ----------------------------------------------------------------------------------

def sidecar(out: Path, kind: str) -> Path:
    """OUT.jsonl -> OUT.<kind>.json (provenance, report, ...)."""
    return out.with_name(out.name + f".{kind}.json")


def guard_outputs(paths: list[Path], overwrite: bool) -> None:
    """Refuse before any work if an output exists (the user's data is never replaced unless asked)."""
    for p in paths:
        if p.exists() and not overwrite:
            raise ConfigError(f"{p} already exists; choose another --out or pass --overwrite")
        if p.exists() and p.is_dir():
            raise ConfigError(f"{p} is a folder; --out must be a file path")
        if not p.parent.exists():
            raise ConfigError(f"{p.parent}: output folder does not exist")


def check_inputs_not_outputs(inputs: list[str], out: Path) -> None:
    for i in inputs:
        if Path(i).exists() and Path(i).resolve() == out.resolve():
            raise ConfigError(f"--out {out} is the input file; write to another file")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def file_sha256(path: str | Path) -> str | None:
    p = Path(path)
    if p.is_file():
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    if p.is_dir():  # a saved datasets folder: hash of its files' hashes, in name order
        h = hashlib.sha256()
        for q in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(q.relative_to(p)).encode() + b"\0" + (file_sha256(q) or "").encode())
        return h.hexdigest()
    return None


@dataclass
class Provenance:
    """The sidecar every output gets: inputs with hashes, the command, counts kept and dropped and why."""

    command: str
    inputs: list[str] = field(default_factory=list)
    rows_in: int = 0
    rows_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def to_dict(self, out: Path) -> dict:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("tunelab")
        except PackageNotFoundError:
            ver = "unknown"
        return {
            "tool": f"tunelab {ver}",
            "command": self.command,
            "argv": ["tunelab"] + sys.argv[1:] if Path(sys.argv[0]).name in ("tunelab", "__main__.py") else sys.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - self.started, 3),
            "inputs": [{"path": str(i), "sha256": file_sha256(i)} for i in self.inputs],
            "output": {"path": str(out), "sha256": file_sha256(out), "rows": self.rows_out},
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "dropped": dict(sorted(self.dropped.items(), key=lambda kv: -kv[1])),
            "settings": self.settings,
            **self.extra,
        }

    def write(self, out: Path) -> Path:
        p = sidecar(out, "provenance")
        write_json(p, self.to_dict(out))
        return p


def write_rows_with_provenance(out: Path, rows: list[dict], prov: Provenance) -> Path:
    """The output file first, then its sidecar (which records the output's hash)."""
    prov.rows_out = len(rows)
    write_jsonl(out, rows)
    return prov.write(out)


# ---- progress -----------------------------------------------------------------------------------

def progress():
    """A rich progress bar with ETA on stderr; progress lines when stderr is not a terminal (ui.Progress)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..ui import Progress, console

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True, label="data")


def fraction(value: float, flag: str, lo: float = 0.0, hi: float = 1.0, lo_open: bool = True) -> float:
    if not ((lo < value if lo_open else lo <= value) and value <= hi):
        raise ConfigError(f"{flag} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value:g}")
    return value
