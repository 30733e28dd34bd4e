"""`tunelab` command line. User mistakes end as one line on stderr and exit code 2.

The commands are the `COMMANDS` registry below, and nothing else: each entry names the command, its one-line
help, the function that adds its arguments and the function that runs it, as "module:function" strings that
are imported only when that command runs. So `tunelab --help`, `--version` and a mistyped command import
neither torch nor transformers (`import tunelab.cli` is light; a test checks it).

Adding a command is one entry in COMMANDS, e.g.
    Command("chat", "talk to a run in the terminal", "tunelab.generate:add_chat_parser", "tunelab.generate:cmd_chat")
with, in that module, `def add_chat_parser(sub): p = sub.add_parser("chat"); p.add_argument(...)` (the name must
be the entry's; the help comes from the entry) and `def cmd_chat(args) -> int`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: str
    """"module:function" called with the subparsers action; it calls sub.add_parser(name) and adds arguments."""
    run: str
    """"module:function" taking the parsed args and returning the exit code."""
    libraries: bool = True
    """False for commands that need no ML library (their quieting of transformers/datasets is skipped)."""


COMMANDS = [
    Command("train", "train a run (LoRA, QLoRA or full fine-tune)", "tunelab.cli:_train_parser",
            "tunelab.cli:cmd_train"),
    Command("check", "preflight: data, tokenizer and config checks without training",
            "tunelab.cli:_check_parser", "tunelab.cli:cmd_check"),
    Command("generate", "answer prompts with a model, run folder or checkpoint",
            "tunelab.generate:add_parser", "tunelab.generate:cmd_generate"),
    Command("eval", "benchmark one or more models / checkpoints on tasks",
            "tunelab.evaluate.harness:add_parser", "tunelab.evaluate.harness:cmd_eval"),
    Command("compare", "answer the same prompts with two models, side by side",
            "tunelab.evaluate.compare:add_parsers", "tunelab.evaluate.compare:cmd_compare"),
    Command("blind", "interactive blind A/B rating of a compare folder (resumable)",
            "tunelab.evaluate.compare:add_parsers", "tunelab.evaluate.compare:cmd_blind"),
    Command("judge", "LLM-as-a-judge over a compare folder (pairwise both orders, or 1-10 grades)",
            "tunelab.evaluate.judge:add_parser", "tunelab.evaluate.judge:cmd_judge"),
    Command("report", "HTML + Markdown report of run, eval and compare folders",
            "tunelab.evaluate.report:add_parser", "tunelab.evaluate.report:cmd_report"),
    Command("sweep", "grid sweep over config keys, one run folder per trial",
            "tunelab.sweep:add_parser", "tunelab.sweep:cmd_sweep"),
    Command("export", "merge a run's adapter into its base and save safetensors (and GGUF)",
            "tunelab.export:add_parser", "tunelab.export:cmd_export"),
    Command("serve", "OpenAI-compatible HTTP server for a model, run folder or checkpoint",
            "tunelab.serve:add_parser", "tunelab.serve:cmd_serve"),
    Command("data", "data workbench: stats, dedup, decontaminate, filter, mix, synth, pairs",
            "tunelab.datatools.cli:add_parser", "tunelab.datatools.cli:cmd_data"),
    Command("chat", "talk to a model or run in the terminal (history, streaming, the run's template)",
            "tunelab.chat:add_parser", "tunelab.chat:cmd_chat"),
    Command("plan", "will this run fit and how long will it take, per GPU (before anything is downloaded)",
            "tunelab.plan:add_parser", "tunelab.plan:cmd_plan"),
    Command("config", "print the resolved config (defaults + file + --set) as YAML",
            "tunelab.cli:_config_parser", "tunelab.cli:cmd_config", libraries=False),
]


def _load(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tunelab")
    except PackageNotFoundError:
        return "unknown (not installed)"


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
        if message.startswith("argument command: invalid choice:"):  # a mistyped command: suggest the near one
            import difflib
            import re

            typed = re.search(r"invalid choice: '([^']*)'", message)
            close = difflib.get_close_matches(typed.group(1) if typed else "", [c.name for c in COMMANDS], n=1)
            if typed:
                message = f"invalid choice: {typed.group(1)!r} " + (
                    f"(did you mean '{close[0]}'?)" if close else f"(commands: {', '.join(c.name for c in COMMANDS)})")
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _OnlyDeclared:
    """The subparsers action as a module's parser function sees it: it may add only the commands the
    registry gives to that function, and their help is the registry's (one place for names and help)."""

    def __init__(self, sub, allowed: dict[str, Command]):
        self._sub, self._allowed = sub, allowed

    def add_parser(self, name, **kwargs):
        if name not in self._allowed:
            raise RuntimeError(f"tunelab.cli: {name!r} is added by a parser function but is not in COMMANDS "
                               f"(or not with that function)")
        kwargs["help"] = self._allowed[name].help
        kwargs.setdefault("description", self._allowed[name].help)
        return self._sub.add_parser(name, **kwargs)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Only the command named in argv gets its real arguments (importing its module); the
    others are listed by name and help, so the top-level help and a mistyped command stay light.
    Without argv every command is built in full (tests use this to check the registry)."""
    parser = _Parser(prog="tunelab", description="Fine-tune open LLMs from one YAML file.")
    parser.add_argument("--version", action="version", version=f"tunelab {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="command")
    wanted = {c.name for c in COMMANDS}
    if argv is not None:
        first = next((a for a in argv if not a.startswith("-")), None)
        wanted = {first} & wanted
    full_fns = {c.arguments for c in COMMANDS if c.name in wanted}  # one function may add several commands
    done: set[str] = set()
    for c in COMMANDS:  # registry order is the help order
        if c.arguments not in full_fns:
            sub.add_parser(c.name, help=c.help, add_help=False)
        elif c.arguments not in done:
            done.add(c.arguments)
            _load(c.arguments)(_OnlyDeclared(sub, {o.name: o for o in COMMANDS if o.arguments == c.arguments}))
        if c.name not in sub.choices:
            raise RuntimeError(f"tunelab.cli: {c.arguments} did not add the command {c.name!r}")
    return parser


def _train_parser(sub) -> None:
    p = sub.add_parser("train")
    _common(p)
    p.add_argument("--output", "-o", help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its newest checkpoint")
    p.add_argument("--launcher", choices=["none", "accelerate"], default="none",
                   help="accelerate: run --num-processes training processes (DDP; see configs/accelerate/)")
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--accelerate-config", help="an accelerate config file (FSDP, DeepSpeed, multi-node)")
    p.add_argument("--collective-timeout", type=int, default=600, metavar="SECONDS",
                   help="with --launcher: a process waiting longer than this for the others (a hang, a dead rank) "
                        "stops the run with an error (default 600)")


def _check_parser(sub) -> None:
    p = sub.add_parser("check")
    _common(p)
    p.add_argument("--examples", type=int, default=1, help="rendered examples to show")


def _config_parser(sub) -> None:
    p = sub.add_parser("config")
    p.add_argument("config", nargs="?", help="run YAML file (omit for the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


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
    out = Path(args.output) if args.output else Path("runs") / Path(args.config).stem
    if args.launcher == "accelerate":  # the training processes check the config again and say its warnings once
        return launch_accelerate(args, out, cfg)
    for w in warnings:
        warn(w)
    summary = run(cfg, out, resume=args.resume, config_dir=Path(args.config).resolve().parent)
    if summary.get("status") == "interrupted" and os.environ.get(LAUNCHED):
        return 0  # a rank started by launch_accelerate: the launching `tunelab train` reports the interrupt
    if summary.get("status") == "interrupted":
        code = 143 if summary.get("signal") == "SIGTERM" else 130
        print(f"tunelab train: interrupted ({summary['signal']}) at step {summary['global_step']}; checkpoint saved. "
              f"Resume with: {resume_command(args, out)}", file=sys.stderr)
        return code
    return 0


def resume_command(args, out: Path) -> str:
    """The interrupted `tunelab train` command with --resume: same config, same --set flags, same launcher."""
    import shlex

    cmd = ["tunelab", "train", args.config, "--output", str(out)]
    for o in args.overrides:
        cmd += ["--set", o]
    if getattr(args, "launcher", "none") == "accelerate" and not os.environ.get(LAUNCHED):
        cmd += ["--launcher", "accelerate"]
        cmd += ["--accelerate-config", args.accelerate_config] if args.accelerate_config else \
            ["--num-processes", str(args.num_processes)]
    return shlex.join(cmd + ["--resume"])


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torch's launcher starts each rank in its own session,
    so a process-group kill would miss them)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


LAUNCHED = "TUNELAB_LAUNCHED"  # set in the ranks that launch_accelerate starts
COLLECTIVE_TIMEOUT = "TUNELAB_COLLECTIVE_TIMEOUT"  # seconds; read by train.training_arguments (ddp_timeout)


def launch_accelerate(args, out: Path, cfg) -> int:
    """Re-run this same `tunelab train` under `accelerate launch` (DDP by default; gloo on CPU)."""
    import shutil
    import socket

    from .config import ConfigError

    exe = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if exe is None:
        raise ConfigError("--launcher accelerate: the accelerate command is not installed")
    cmd = [exe, "launch"]
    if args.accelerate_config:
        if not Path(args.accelerate_config).is_file():
            raise ConfigError(f"--accelerate-config {args.accelerate_config}: file not found")
        cmd += ["--config_file", args.accelerate_config]
        _check_cpu_fsdp(args.accelerate_config, cfg.train.method)
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
    if args.collective_timeout < 1:
        raise ConfigError("--collective-timeout must be >= 1 second")
    env = dict(os.environ, **{LAUNCHED: "1", COLLECTIVE_TIMEOUT: str(args.collective_timeout)})
    return run_launcher(cmd, env, args, out)


def _check_cpu_fsdp(config_file: str, method: str) -> None:
    """An FSDP accelerate config on a CPU-only machine: tunelab's SFT Trainer runs FSDP2 on the CPU processes
    (tunelab/distributed.py). Say up front, in one line, what cannot run there: FSDP1 (accelerate needs a
    GPU for it) and parameter offload (FSDP2 pins host memory, which needs a GPU; on CPU processes the
    parameters are in host memory already). The other methods (TRL trainers) get plain DDP: say so."""
    import yaml

    from .config import ConfigError
    from .ui import warn

    try:
        acc = yaml.safe_load(Path(config_file).read_text())
    except (OSError, yaml.YAMLError):
        return  # accelerate reads it next and says what is wrong
    if not isinstance(acc, dict) or str(acc.get("distributed_type", "")).upper() != "FSDP":
        return
    import torch

    if torch.cuda.is_available():
        return
    fsdp = acc.get("fsdp_config") or {}
    if method != "sft":
        warn(f"{config_file}: FSDP on CPU processes is wired into tunelab's SFT trainer only; train.method={method} "
             "runs as plain DDP (every process holds the whole model; same losses, no memory saving)")
        return
    if str(fsdp.get("fsdp_version", 1)) != "2":
        raise ConfigError(f"{config_file}: fsdp_version {fsdp.get('fsdp_version', 1)} (FSDP1) needs GPUs; on this "
                          "CPU-only machine set fsdp_version: 2 (FSDP2 runs on CPU processes)")
    if str(fsdp.get("fsdp_offload_params", False)).lower() == "true":
        raise ConfigError(f"{config_file}: fsdp_offload_params: true needs a GPU (FSDP2 pins host memory for it; on "
                          "CPU processes the parameters are in host memory already); set it to false")


def run_launcher(cmd: list[str], env: dict, args, out: Path) -> int:
    """Run the launcher in its own session, so that this process alone decides what the ranks get:
    SIGINT/SIGTERM here is sent once to every rank (each finishes its step, checkpoints and exits,
    as a single-process run does), then the hint to resume is printed; a second signal kills the
    launcher and all ranks at once (no checkpoint). Nothing outlives this process."""
    import json
    import signal
    import subprocess

    import psutil  # a dependency of accelerate

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        if len(got) == 1:
            print(f"tunelab train: {signal.Signals(signum).name}: the ranks save a checkpoint after the current "
                  f"step, then stop ({signal.Signals(signum).name} again kills them without saving)", file=sys.stderr)
            try:
                ranks = psutil.Process(proc.pid).children()  # the launcher's workers, not their helpers
            except psutil.NoSuchProcess:
                return
            for r in ranks:
                with contextlib.suppress(psutil.NoSuchProcess):
                    r.send_signal(signum)
        else:
            kill_tree(proc.pid)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        kill_tree(proc.pid)  # whatever is left (normally nothing)
    if not got:
        return code
    name = signal.Signals(got[0]).name
    summary = out / "summary.json"
    status = json.loads(summary.read_text()) if summary.is_file() else {}
    if code == 0 and status.get("status") == "interrupted":
        print(f"tunelab train: interrupted ({name}) at step {status['global_step']}; checkpoint saved. "
              f"Resume with: {resume_command(args, out)}", file=sys.stderr)
    else:
        print(f"tunelab train: interrupted ({name}); stopped the launcher and every rank without a final "
              f"checkpoint. Resume from the newest one with: {resume_command(args, out)}", file=sys.stderr)
    return 143 if got[0] == signal.SIGTERM else 130


def cmd_check(args) -> int:
    from .check import check

    return check(args)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are user mistakes (one line, exit 2). Those of modules not imported yet
    can't have been raised, so they are looked up in sys.modules instead of imported (torch stays unloaded)."""
    from .config import ConfigError
    from .data.sources import DataError
    from .fsutil import DiskFullError

    types_ = [ConfigError, DataError, DiskFullError]
    for module, name in (("tunelab.data.preflight", "PreflightError"), ("tunelab.models", "ModelError"),
                         ("tunelab.train", "TrainingError")):
        if module in sys.modules:
            types_.append(getattr(sys.modules[module], name))
    return tuple(types_)


def main(argv: list[str] | None = None) -> int:
    # before any of them is imported (bitsandbytes warns at import that the optional `kernels` package is missing)
    for name in ("bitsandbytes", "httpx", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if int(os.environ.get("RANK", "0")) > 0:  # other ranks of a distributed run: the main one talks
        from .ui import console

        console.quiet = True
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    if command.libraries:
        _quiet_libraries()
    try:
        return _load(command.run)(args)
    except KeyboardInterrupt:
        print(f"tunelab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        print(f"tunelab {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
