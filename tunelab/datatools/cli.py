"""Registers `tunelab data <command>` and dispatches to the subcommand modules."""

from __future__ import annotations

import importlib

COMMANDS = ["stats", "dedup", "decontaminate", "filter", "mix", "synth", "pairs"]
MODULES = {"stats": "stats", "dedup": "dedup", "decontaminate": "decontaminate", "filter": "filters",
           "mix": "mix", "synth": "synth", "pairs": "pairs"}


def _module(name: str):
    return importlib.import_module(f"tunelab.datatools.{MODULES[name]}")


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="data workbench: stats, dedup, decontaminate, filter, mix, synth, pairs")
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=type(p))
    for name in COMMANDS:
        try:
            mod = _module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("tunelab.datatools"):
                continue  # a subcommand not built yet
            raise
        mod.add_parser(dsub)


def cmd_data(args) -> int:
    mod = _module(args.data_command)
    return getattr(mod, f"cmd_{args.data_command}")(args)
