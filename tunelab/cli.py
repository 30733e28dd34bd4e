"""`tunelab` command line. User mistakes end as one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars; tunelab shows its own
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("httpx", "huggingface_hub", "accelerate", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.learning_rate=2e-4 (repeatable)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (not usage + error) with exit code 2."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tunelab", description="Fine-tune open LLMs from one YAML file.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a run (LoRA, QLoRA or full fine-tune)")
    _common(p)
    p.add_argument("--output", "-o", help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its newest checkpoint")
    p.add_argument("--launcher", choices=["none", "accelerate"], default="none",
                   help="accelerate: run --num-processes training processes (DDP; see configs/accelerate/)")
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--accelerate-config", help="an accelerate config file (FSDP, DeepSpeed, multi-node)")

    p = sub.add_parser("check", help="preflight: data, tokenizer and config checks without training")
    _common(p)
    p.add_argument("--examples", type=int, default=1, help="rendered examples to show")

    from . import export, generate, serve, sweep
    from .evaluate import compare, harness, judge, report

    generate.add_parser(sub)
    harness.add_parser(sub)
    compare.add_parsers(sub)
    judge.add_parser(sub)
    report.add_parser(sub)
    sweep.add_parser(sub)
    export.add_parser(sub)
    serve.add_parser(sub)
    from . import chat

    chat.add_parser(sub)
    from .datatools import cli as datatools_cli

    datatools_cli.add_parser(sub)

    p = sub.add_parser("config", help="print the resolved config (defaults + file + --set) as YAML")
    p.add_argument("config", nargs="?", help="run YAML file (omit for the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def cmd_config(args) -> int:
    import yaml

    from .config import load_config

    cfg, warnings = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .train import run
    from .ui import warn

    cfg, warnings = load_config(args.config, args.overrides)
    for w in warnings:
        warn(w)
    out = Path(args.output) if args.output else Path("runs") / Path(args.config).stem
    if args.launcher == "accelerate":
        return launch_accelerate(args, out)
    summary = run(cfg, out, resume=args.resume, config_dir=Path(args.config).resolve().parent)
    if summary.get("status") == "interrupted":
        code = 143 if summary.get("signal") == "SIGTERM" else 130
        print(f"tunelab train: interrupted ({summary['signal']}) at step {summary['global_step']}; checkpoint saved. "
              f"Resume with: tunelab train {args.config} --output {out} --resume", file=sys.stderr)
        return code
    return 0


def launch_accelerate(args, out: Path) -> int:
    """Re-run this same `tunelab train` under `accelerate launch` (DDP by default; gloo on CPU)."""
    import shutil
    import socket
    import subprocess

    from .config import ConfigError

    exe = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if exe is None:
        raise ConfigError("--launcher accelerate: the accelerate command is not installed")
    cmd = [exe, "launch"]
    if args.accelerate_config:
        if not Path(args.accelerate_config).is_file():
            raise ConfigError(f"--accelerate-config {args.accelerate_config}: file not found")
        cmd += ["--config_file", args.accelerate_config]
    else:
        if args.num_processes < 1:
            raise ConfigError("--num-processes must be >= 1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # torchrun-style launch; with no GPU the Trainer sets up DDP on CPU with the gloo backend
        cmd += ["--multi_gpu", "--num_processes", str(args.num_processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    cmd += ["-m", "tunelab", "train", args.config, "--output", str(out)]
    for o in args.overrides:
        cmd += ["--set", o]
    if args.resume:
        cmd.append("--resume")
    return subprocess.call(cmd)


def cmd_check(args) -> int:
    from .check import check

    return check(args)


def main(argv: list[str] | None = None) -> int:
    if int(os.environ.get("RANK", "0")) > 0:  # other ranks of a distributed run: the main one talks
        from .ui import console

        console.quiet = True
    for name in ("bitsandbytes", "httpx", "huggingface_hub", "accelerate"):  # before any of them is imported
        logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from .config import ConfigError
    from .data.preflight import PreflightError
    from .data.sources import DataError
    from .fsutil import DiskFullError
    from .models import ModelError
    from .train import TrainingError

    from .evaluate.compare import cmd_blind, cmd_compare
    from .evaluate.harness import cmd_eval
    from .evaluate.judge import cmd_judge
    from .evaluate.report import cmd_report
    from .export import cmd_export
    from .generate import cmd_generate
    from .serve import cmd_serve
    from .sweep import cmd_sweep
    from .datatools.cli import cmd_data
    from .chat import cmd_chat

    handlers = {"train": cmd_train, "check": cmd_check, "config": cmd_config, "generate": cmd_generate,
                "eval": cmd_eval, "compare": cmd_compare, "blind": cmd_blind, "judge": cmd_judge,
                "report": cmd_report, "sweep": cmd_sweep,
                "export": cmd_export, "serve": cmd_serve, "data": cmd_data,
                "chat": cmd_chat}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, ModelError, PreflightError, TrainingError, DiskFullError) as e:
        print(f"tunelab {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"tunelab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
