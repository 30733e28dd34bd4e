"""GRPO with verifiable rewards on trl.GRPOTrainer.

A reward is either a `kind: generate` task file (the one `tunelab eval` scores with: its regex
extracts the answer, exact match against the row's reference answer, the task's stop strings cut
the completion as generation would), or a Python function `module:function` called as TRL calls
reward functions: f(prompts=[...], completions=[...], completion_ids=[...], **columns) -> floats.
Several rewards combine with grpo.reward_weights. On CPU the policy samples its own completions
(transformers generate); grpo.use_vllm hands sampling to vLLM on a GPU.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

from ..config import ConfigError
from ..train import TrainingError
from ..ui import console
from .run import Guarded, MethodSetup, args_for, callbacks

WHERE = "tunelab_where"  # dataset column naming each row's file:line, for reward errors


class RewardError(TrainingError):
    """A reward function that raised or returned garbage during training (one line, exit 2)."""


def _task_reward(path: Path, answer_field: str):
    """A reward from a `kind: generate` task file: 1.0 when the task's scorer says exact match."""
    import yaml

    from ..evaluate.scoring import exact_match
    from ..evaluate.tasks import TaskError, fill_template, load_task_file

    try:
        task = load_task_file(path)
    except TaskError as e:
        raise ConfigError(f"grpo.rewards: {e}") from None
    if task.kind != "generate":
        raise ConfigError(f"grpo.rewards: {path} is a {task.kind} task; a reward needs a `kind: generate` task "
                          f"(regex extraction + exact match of a generated answer)")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    target_tpl = spec.get("target", "{" + answer_field + "}")

    def reward(prompts, completions, **columns):
        out = []
        for i, text in enumerate(completions):
            row = {k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
            target = str(fill_template(target_tpl, row, str(row.get(WHERE, "?")))).strip()
            cut = min((j for j in (text.find(s) for s in task.stop) if j >= 0), default=len(text))
            out.append(exact_match(text[:cut], target, task.regex))
        return out

    reward.__name__ = f"task:{task.name}"
    return reward


def _import_reward(spec: str, config_dir: Path | None):
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise ConfigError(f"grpo.rewards: '{spec}' is neither a task .yaml file nor module:function")
    extra = [str(p) for p in (config_dir, Path.cwd()) if p is not None and str(p) not in sys.path]
    sys.path[:0] = extra
    try:
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, fn_name)
    except Exception as e:
        raise ConfigError(f"grpo.rewards: can't import reward '{spec}' ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: '{spec}' is not a function")
    return fn


def _guard(fn, name: str):
    """Call a reward; a raise or a wrong result becomes one line naming the reward and the row."""

    def call(prompts, completions, **columns):
        wheres = columns.get(WHERE) or ["?"] * len(completions)
        try:
            got = list(fn(prompts=prompts, completions=completions, **columns))
        except Exception as e:
            row = wheres[0]
            for i in range(len(completions)):  # find the row it fails on
                one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == len(completions) else v)
                       for k, v in columns.items()}
                try:
                    fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1], **one)
                except Exception:
                    row = wheres[i]
                    break
            raise RewardError(f"reward '{name}' raised {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''} "
                              f"on row {row}") from None
        if len(got) != len(completions):
            raise RewardError(f"reward '{name}' returned {len(got)} values for {len(completions)} completions "
                              f"(rows {wheres[0]}...)")
        for i, v in enumerate(got):
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(float(v))):
                raise RewardError(f"reward '{name}' returned {v!r} (not a finite number) on row {wheres[i]}")
        return [None if v is None else float(v) for v in got]

    call.__name__ = name
    return call


def build_rewards(cfg, s: MethodSetup, config_dir: Path | None) -> list:
    """The reward callables, each tried on the first rows (with their reference answer as the completion,
    where the data has one) so a broken reward stops the run before anything is written."""
    out = []
    for spec in cfg.grpo.rewards:
        p = Path(spec).expanduser()
        if config_dir is not None and not p.is_absolute() and not p.exists() and (config_dir / p).exists():
            p = config_dir / p
        if spec.endswith((".yaml", ".yml")):
            if not p.is_file():
                raise ConfigError(f"grpo.rewards: task file not found: {spec}")
            fn = _guard(_task_reward(p, cfg.grpo.answer_field), spec)
        else:
            fn = _guard(_import_reward(spec, config_dir), spec)
        sample = s.train[:4]
        cols = _columns(sample)
        completions = [str(r.row.get(cfg.grpo.answer_field, "")) for r in sample]
        try:
            fn([r.prompt for r in sample], completions, **cols)
        except RewardError as e:
            raise ConfigError(f"grpo.rewards: {e}") from None
        out.append(fn)
    return out


def _columns(rows) -> dict:
    keys = sorted({k for r in rows for k in r.row})
    cols = {k: [r.row.get(k) for r in rows] for k in keys}
    cols[WHERE] = [r.where for r in rows]
    return cols


def _dataset(rows):
    import datasets

    if not rows:
        return None
    data = {"prompt": [r.prompt for r in rows]}
    for k, v in _columns(rows).items():
        if k != "prompt":
            # columns of mixed types can't be an Arrow column: keep them as text
            data[k] = (v if len({type(x) for x in v if x is not None}) <= 1
                       else [None if x is None else str(x) for x in v])
    return datasets.Dataset.from_dict(data)


def make_grpo_trainer(model, out: Path, s: MethodSetup, rewards: list, peft_config=None):
    import logging

    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    logging.getLogger("trl").setLevel(logging.ERROR)
    cfg, g = s.cfg, s.cfg.grpo

    class Trainer(Guarded, GRPOTrainer):
        pass

    if g.use_vllm and s.device != "cuda":
        raise ConfigError("grpo.use_vllm needs a GPU; on CPU the model generates its own samples")
    args = args_for(cfg, out, s, GRPOConfig, num_generations=g.num_generations, temperature=g.temperature,
                    top_p=g.top_p, max_completion_length=g.max_completion_length, beta=g.beta, epsilon=g.epsilon,
                    loss_type=g.loss_type, scale_rewards=g.scale_rewards, reward_weights=g.reward_weights,
                    use_vllm=g.use_vllm, disable_dropout=True, log_completions=False)
    # (remove_unused_columns=False, as tunelab always sets it: the rows' extra columns, reference
    # answers and file:line, reach the reward functions)
    trainer = Trainer(model=model, reward_funcs=rewards, args=args, train_dataset=_dataset(s.train),
                      eval_dataset=_dataset(s.evals), processing_class=s.tokenizer, callbacks=callbacks(cfg, out),
                      peft_config=peft_config)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    console.print(f"[dim]GRPO: {g.num_generations} samples per prompt, temperature {g.temperature}, up to "
                  f"{g.max_completion_length} tokens; rewards {', '.join(g.rewards)}"
                  + (f" weighted {g.reward_weights}" if g.reward_weights else "")
                  + ("; KL to the base (adapter disabled)" if g.beta > 0 else "; no KL term (beta 0)") + "[/dim]")
    return trainer
