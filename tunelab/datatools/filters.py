"""Row filters, as `tunelab data filter` and as `data:` options of a run, each drop counted by reason.

min/max response length (characters), script (the row's main script: Latin, Hangul, Han, ...),
a response that repeats the instruction, refusals by a phrase list (the user's file, one phrase a
line, `#` comments), and only rows with an empty input (the recipe's filter, already a run option).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..data.templates import Example
from .common import (
    SCRIPT_NAMES,
    Provenance,
    add_input_args,
    add_output_args,
    check_inputs_not_outputs,
    example_text,
    guard_outputs,
    load_from_args,
    main_script,
    normalize,
    write_rows_with_provenance,
)


@dataclass
class RowFilter:
    min_response_chars: int | None = None
    max_response_chars: int | None = None
    scripts: list[str] = field(default_factory=list)
    drop_repeats: bool = False
    refusal_phrases: list[str] = field(default_factory=list)
    only_empty_input: bool = False
    prefix: str = "--"
    """How reasons name the settings: '--' (flags) or 'data.' (run options)."""

    def name(self, key: str) -> str:
        return f"--{key.replace('_', '-')}" if self.prefix == "--" else f"data.{key}"

    def validate(self) -> "RowFilter":
        for key in ("min_response_chars", "max_response_chars"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise ConfigError(f"{self.name(key)} must be >= 0, got {v}")
        if self.min_response_chars is not None and self.max_response_chars is not None \
                and self.min_response_chars > self.max_response_chars:
            raise ConfigError(f"{self.name('min_response_chars')} ({self.min_response_chars}) is above "
                              f"{self.name('max_response_chars')} ({self.max_response_chars})")
        known = {s.lower(): s for s in SCRIPT_NAMES}
        fixed = []
        for s in self.scripts:
            if s.lower() not in known:
                raise ConfigError(f"{self.name('scripts')}: unknown script '{s}' (known: {', '.join(SCRIPT_NAMES)})")
            fixed.append(known[s.lower()])
        self.scripts = fixed
        return self

    @property
    def active(self) -> bool:
        return bool(self.min_response_chars is not None or self.max_response_chars is not None or self.scripts
                    or self.drop_repeats or self.refusal_phrases or self.only_empty_input)

    def reason(self, ex: Example) -> str | None:
        """Why the example is dropped, or None to keep it. The reason names the setting, so counts group."""
        n = len(ex.response.strip())
        if self.only_empty_input and ex.input.strip():
            return f"non-empty input ({self.name('only_empty_input')})"
        if self.min_response_chars is not None and n < self.min_response_chars:
            return f"response shorter than {self.min_response_chars} characters ({self.name('min_response_chars')})"
        if self.max_response_chars is not None and n > self.max_response_chars:
            return f"response longer than {self.max_response_chars} characters ({self.name('max_response_chars')})"
        if self.scripts:
            s = main_script(example_text(ex))
            if s not in self.scripts:
                return f"script {s} not in {','.join(self.scripts)} ({self.name('scripts')})"
        if self.drop_repeats and repeats_instruction(ex):
            name = self.name("drop_repeats" if self.prefix == "--" else "drop_response_repeats_instruction")
            return f"response repeats the instruction ({name})"
        if self.refusal_phrases:
            resp = f" {normalize(ex.response)} "
            for p in self.refusal_phrases:
                if f" {p} " in resp:
                    return f"refusal phrase ({self.name('refusals' if self.prefix == '--' else 'refusal_phrases')})"
        return None


def repeats_instruction(ex: Example) -> bool:
    """The response is the instruction again, or starts by echoing all of it (instructions of 3+ words)."""
    ins, resp = normalize(ex.instruction), normalize(ex.response)
    if not ins or not resp:
        return False
    return resp == ins or (len(ins.split()) >= 3 and resp.startswith(ins))


def read_phrases(path: str | Path, flag: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: file not found")
    phrases = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        norm = normalize(line)
        if not norm:
            raise ConfigError(f"{path}:{n}: phrase '{line}' has no letters or digits")
        phrases.append(norm)
    if not phrases:
        raise ConfigError(f"{flag} {path}: no phrases in the file (one a line; # starts a comment)")
    return phrases


def from_config(cfg, base: Path | None = None) -> RowFilter:
    """The run's data.* filter options (only_empty_input stays where the recipe has it, in the pipeline)."""
    refusals = []
    if cfg.refusal_phrases:
        path = Path(cfg.refusal_phrases)
        if base is not None and not path.is_absolute() and not path.exists() and (base / path).exists():
            path = base / path
        refusals = read_phrases(path, "data.refusal_phrases:")
    return RowFilter(cfg.min_response_chars, cfg.max_response_chars, list(cfg.scripts),
                     cfg.drop_response_repeats_instruction, refusals, prefix="data.").validate()


def apply_config_filters(cfg, pairs: list, stats, base: Path | None = None) -> list:
    """Pipeline hook: drop (where, Example) pairs by the run's data.* filters, counting each reason in stats."""
    f = from_config(cfg, base)
    if not f.active:
        return pairs
    kept = []
    for where, ex in pairs:
        why = f.reason(ex)
        if why:
            stats.drop(why, where)
        else:
            kept.append((where, ex))
    return kept


def add_parser(sub) -> None:
    p = sub.add_parser("filter", help="drop rows by response length, script, echoed instruction, refusal phrases")
    add_input_args(p)
    add_output_args(p)
    p.add_argument("--min-response-chars", type=int)
    p.add_argument("--max-response-chars", type=int)
    p.add_argument("--script", default="", help=f"keep rows whose main script is one of these, comma-separated "
                                                f"({', '.join(SCRIPT_NAMES)})")
    p.add_argument("--drop-repeats", action="store_true", help="drop rows whose response repeats the instruction")
    p.add_argument("--refusals", metavar="FILE",
                   help="drop rows whose response holds a phrase of this file (one a line)")
    p.add_argument("--only-empty-input", action="store_true", help="keep only rows with an empty input")


def cmd_filter(args) -> int:
    from ..ui import console

    f = RowFilter(args.min_response_chars, args.max_response_chars,
                  [s.strip() for s in args.script.split(",") if s.strip()], args.drop_repeats,
                  read_phrases(args.refusals, "--refusals") if args.refusals else [], args.only_empty_input).validate()
    if not f.active:
        raise ConfigError("no filter given (--min-response-chars, --max-response-chars, --script, --drop-repeats, "
                          "--refusals, --only-empty-input)")
    out = Path(args.out)
    guard_outputs([out, out.with_name(out.name + ".provenance.json")], args.overwrite)
    check_inputs_not_outputs([args.input], out)
    ds = load_from_args(args)
    prov = Provenance("filter", [args.input] + ([args.refusals] if args.refusals else []), rows_in=len(ds.rows),
                      settings={"format": ds.format, "fields": ds.fields, "min_response_chars": f.min_response_chars,
                                "max_response_chars": f.max_response_chars, "scripts": f.scripts,
                                "drop_repeats": f.drop_repeats, "refusal_phrases": len(f.refusal_phrases),
                                "only_empty_input": f.only_empty_input})
    kept, examples = [], {}
    for r in ds.rows:
        why = f"{r.problem} (train would drop it)" if r.example is None else f.reason(r.example)
        if why:
            prov.drop(why)
            examples.setdefault(why, []).append(r.where)
        else:
            kept.append(r.raw)
    prov.extra["dropped_examples"] = {k: v[:5] for k, v in examples.items()}
    write_rows_with_provenance(out, kept, prov)
    console.print(f"filter {args.input}: {len(ds.rows)} rows, kept {len(kept)} -> {out}")
    for why, n in sorted(prov.dropped.items(), key=lambda kv: -kv[1]):
        console.print(f"  dropped {n}: {why} (e.g. {', '.join(examples[why][:3])})")
    return 0
