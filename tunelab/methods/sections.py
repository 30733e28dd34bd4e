"""Config sections of the methods past SFT (`train.method`), one section per method family.

They are plain dataclasses like every other section in tunelab/config.py, so unknown keys get a
did-you-mean and wrong types a file:line error. Names are TRL's config names and mean the same.
A section whose keys are set in a run of another method is a one-line error (`check_sections`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

METHODS = ["sft", "dpo", "orpo", "kto", "simpo", "grpo", "reward", "classify"]
PAIRED = ("dpo", "orpo", "simpo", "reward")  # methods trained on prompt/chosen/rejected pairs


@dataclass
class DpoConfig:
    """train.method=dpo (trl.DPOTrainer)."""

    beta: float = 0.1
    """How far the policy may move from the reference (higher = closer)."""
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """sigmoid (DPO), ipo, hinge, robust, bco_pair, sppo_hard, apo_zero, apo_down, sigmoid_norm, ... or several."""
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    """Robust DPO / EXO label smoothing."""


@dataclass
class KtoConfig:
    """train.method=kto (trl.KTOTrainer) on unpaired prompt/completion/label rows."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass
class OrpoConfig:
    """train.method=orpo (trl.experimental.orpo.ORPOTrainer): no reference model."""

    beta: float = 0.1
    """ORPO's lambda: weight of the odds-ratio term against the SFT loss."""


@dataclass
class SimpoConfig:
    """train.method=simpo: trl.experimental.cpo.CPOTrainer with loss_type=simpo (reference-free)."""

    beta: float = 2.0
    gamma: float = 0.5
    """Target reward margin (CPOConfig.simpo_gamma)."""
    cpo_alpha: float = 0.0
    """Weight of an added SFT term (0 = pure SimPO)."""


@dataclass
class GrpoConfig:
    """train.method=grpo (trl.GRPOTrainer) with verifiable rewards."""

    rewards: list[str] = field(default_factory=list)
    """Each a `kind: generate` task .yaml (its regex + exact match against the row's reference answer)
    or a Python function `module:function` (called as TRL calls reward functions)."""
    reward_weights: list[float] | None = None
    num_generations: int = 4
    """Completions sampled per prompt (the group whose rewards are compared)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 64
    beta: float = 0.0
    """KL weight against the reference (0 = TRL's default: no reference forward pass at all)."""
    epsilon: float = 0.2
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    use_vllm: bool = False
    """Generate with vLLM (needs a GPU and vllm installed); otherwise the model generates itself."""
    answer_field: str = "output"
    """Column of the data holding the reference answer a task-file reward compares with."""


@dataclass
class ClassifyConfig:
    """train.method=classify: AutoModelForSequenceClassification + LoRA (task_type SEQ_CLS)."""

    text_field: str = "text"
    label_field: str = "label"
    text_pair_field: str | None = None
    """An optional second text column (e.g. an answer to the text), encoded as a pair."""


SECTIONS = {"dpo": DpoConfig, "kto": KtoConfig, "orpo": OrpoConfig, "simpo": SimpoConfig,
            "grpo": GrpoConfig, "classify": ClassifyConfig}
LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def check_sections(cfg, where_of, fail, did_you_mean, written=None) -> None:
    """Errors for method sections: set in a run of another method, or impossible values.

    `written`: the dotted keys the YAML file and --set flags hold (tunelab.config.load_config). A key of
    another method's section there is an error even at its default value (`dpo: {beta: 0.1}` in an SFT
    run is a config meant for DPO); without it (a config built in code) only non-default values are."""
    method = cfg.train.method
    for name, cls in SECTIONS.items():
        sec = getattr(cfg, name)
        if method == name:
            continue
        given = sorted(k for k in (written or ()) if k == name or k.startswith(name + "."))
        if given:
            key = next((k for k in given if k != name), None)
            if key is None:
                fail(where_of(name), f"the {name}: section is for train.method={name}, but train.method is "
                                     f"{method}; remove it or set train.method={name}")
            fail(where_of(key), f"{key} is a {name} setting, but train.method is {method}; remove it or set "
                                f"train.method={name}")
        if sec != cls():
            changed = [f.name for f in dataclasses.fields(cls) if getattr(sec, f.name) != getattr(cls(), f.name)]
            key = f"{name}.{changed[0]}"
            fail(where_of(key), f"{key} is a {name} setting, but train.method is {method}; remove it or set "
                                f"train.method={name}")
    if method == "sft":
        return
    if cfg.data.packing:
        fail(where_of("data.packing"), f"data.packing applies to train.method=sft only (not {method})")
    if method in ("reward", "classify") and cfg.quantization.load_in_4bit and not cfg.lora.enabled:
        fail(where_of("lora.enabled"), f"{method} with a 4-bit base needs lora.enabled=true")
    d = cfg.dpo
    for lt in d.loss_type:
        if lt not in LOSS_TYPES:
            fail(where_of("dpo.loss_type"), f"dpo.loss_type '{lt}' is not one of: {', '.join(LOSS_TYPES)}"
                 + did_you_mean(lt, LOSS_TYPES))
    if d.loss_weights is not None and len(d.loss_weights) != len(d.loss_type):
        fail(where_of("dpo.loss_weights"), f"dpo.loss_weights has {len(d.loss_weights)} values for "
                                           f"{len(d.loss_type)} dpo.loss_type entries")
    for name in ("dpo", "kto", "orpo", "simpo"):
        if getattr(cfg, name).beta <= 0:
            fail(where_of(f"{name}.beta"), f"{name}.beta must be > 0, got {getattr(cfg, name).beta}")
    g = cfg.grpo
    if method == "grpo":
        if not g.rewards:
            fail(where_of("grpo.rewards"), "train.method=grpo needs grpo.rewards: a `kind: generate` task .yaml "
                                           "or a Python function module:function (or several)")
        if g.reward_weights is not None and len(g.reward_weights) != len(g.rewards):
            fail(where_of("grpo.reward_weights"), f"grpo.reward_weights has {len(g.reward_weights)} values for "
                                                  f"{len(g.rewards)} grpo.rewards")
        if g.num_generations < 2:
            fail(where_of("grpo.num_generations"), "grpo.num_generations must be >= 2 (GRPO compares a group)")
        t = cfg.train
        batch = t.per_device_train_batch_size * t.gradient_accumulation_steps
        if batch % g.num_generations:
            fail(where_of("grpo.num_generations"),
                 f"grpo.num_generations={g.num_generations} must divide per_device_train_batch_size x "
                 f"gradient_accumulation_steps ({batch}): each optimizer step holds whole groups")
        if g.temperature <= 0:
            fail(where_of("grpo.temperature"), "grpo.temperature must be > 0 (GRPO samples)")
        if g.max_completion_length < 1:
            fail(where_of("grpo.max_completion_length"), "grpo.max_completion_length must be >= 1")
        if g.loss_type not in ("grpo", "dapo", "dr_grpo", "bnpo"):
            fail(where_of("grpo.loss_type"), "grpo.loss_type must be one of grpo, dapo, dr_grpo, bnpo")
