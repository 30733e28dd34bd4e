"""Methods past SFT (issue 12): DPO, GRPO, preference data and its preflight, bad input, on the tiny model."""

import json
import random
from pathlib import Path

import pytest

from tunelab.cli import main

from conftest import SHARED

HH = SHARED / "pref" / "hh_rlhf_harmless" / "test.jsonl"


def write_pairs(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"instruction": f"Add {a} and {b}.", "chosen": f"The answer is {a + b}.",
                     "rejected": "I can not say what the sum is."})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def method_config(tmp_path: Path, model: Path, data: Path, method: str, extra: str = "", steps: int = 4) -> Path:
    p = tmp_path / f"{method}.yaml"
    p.write_text(f"""
model:
  name: {model}
data:
  path: {data}
  max_seq_length: 128
train:
  method: {method}
  per_device_train_batch_size: 4
  per_device_eval_batch_size: 4
  gradient_accumulation_steps: 1
  warmup_steps: 0
  max_steps: {steps}
  eval_steps: {steps}
  save_steps: {steps}
  logging_steps: 1
  learning_rate: 1.0e-2
  report_to: [tensorboard]
{extra}
""")
    return p


def _history(out: Path) -> list[dict]:
    ck = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((ck / "trainer_state.json").read_text())["log_history"]


# --- data -----------------------------------------------------------------------------------


@pytest.mark.skipif(not HH.is_file(), reason="shared HH-RLHF data not present")
def test_hh_rlhf_split_is_exact_on_real_rows():
    from tunelab.config import DataConfig
    from tunelab.data.preference import split_shared_dialogue, to_pair

    rows = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) > 2000
    for i, r in enumerate(rows):
        prompt, c, rj = split_shared_dialogue(r["chosen"], r["rejected"])
        assert prompt + c == r["chosen"] and prompt + rj == r["rejected"], i
        assert prompt.endswith("\n\nAssistant:") and "\n\nHuman:" not in c + rj
    # row 1 of the file: the replies differ after a shared 3-turn history
    p = to_pair(rows[0], DataConfig(), "hh:1")
    assert [m["role"] for m in p.prompt.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert p.prompt.messages[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert p.chosen.startswith("No, sorry!") and p.rejected.startswith("There are lots of funny things")
    assert p.prompt.instruction.startswith("Human: what are some pranks") and p.prompt.instruction.endswith("pens")


def test_chat_message_pairs_share_all_but_last():
    from tunelab.config import DataConfig
    from tunelab.data.preference import to_pair
    from tunelab.data.sources import DataError

    u = {"role": "user", "content": "hi"}
    row = {"chosen": [u, {"role": "assistant", "content": "hello"}], "rejected": [u, {"role": "assistant", "content": "go"}]}
    p = to_pair(row, DataConfig(), "x:1")
    assert p.prompt.messages == [u] and (p.chosen, p.rejected) == ("hello", "go")
    row["rejected"] = [{"role": "user", "content": "other"}, {"role": "assistant", "content": "go"}]
    with pytest.raises(DataError, match="differ before their last message"):
        to_pair(row, DataConfig(), "x:1")


def test_pair_preflight_findings(tmp_path, tiny_model, capsys):
    long = " ".join(["the answer"] * 40)
    rows = [{"prompt": "Add 1 and 2.", "chosen": "same", "rejected": "same"},
            {"prompt": "Add 1 and 2.", "chosen": "", "rejected": "no"},
            {"prompt": "Add 3 and 4.", "chosen": long, "rejected": "seven"}]
    rows += [{"prompt": f"Add {i} and {i}.", "chosen": f"The answer is {2 * i}, since {i} plus {i} is {2 * i}.",
              "rejected": "No."} for i in range(10)]
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = method_config(tmp_path, tiny_model, data, "dpo", "dpo:\n  beta: 0.1")
    assert main(["check", str(cfg), "--set", "data.max_seq_length=90"]) == 0
    err = capsys.readouterr().err.replace("\n", " ")
    assert "chosen == rejected" in err and "empty chosen or rejected" in err
    assert "cut unfairly" in err and "p.jsonl:3" in err
    assert "length bias" in err
    # the prompt alone reaching max_seq_length is fatal, naming the row
    assert main(["check", str(cfg), "--set", "data.max_seq_length=20"]) == 2
    assert "the prompt alone is" in capsys.readouterr().err


# --- DPO ------------------------------------------------------------------------------------


def test_dpo_reward_margin_rises_and_reaches_tensorboard(tmp_path, tiny_model):
    cfg = method_config(tmp_path, tiny_model, write_pairs(tmp_path / "pairs.jsonl"), "dpo", steps=6)
    out = tmp_path / "dpo"
    assert main(["train", str(cfg), "--output", str(out)]) == 0
    hist = [h for h in _history(out) if "rewards/margins" in h]
    assert len(hist) == 6
    assert abs(hist[0]["rewards/margins"]) < 1e-4  # step 1: the policy is the reference
    margins = [h["rewards/margins"] for h in hist]
    assert margins[-1] > 0.5 and margins[-1] > max(margins[:3]) and hist[-1]["rewards/accuracies"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_method"] == "dpo" and summary["last_rewards/margins"] > summary["first_rewards/margins"]
    events = b"".join(p.read_bytes() for p in (out / "tensorboard").rglob("events.*"))
    for tag in (b"rewards/margins", b"rewards/chosen", b"rewards/rejected", b"rewards/accuracies"):
        assert tag in events
    assert (out / "final" / "adapter_model.safetensors").is_file() and not (out / "final" / "ref").exists()


def test_dpo_from_sft_run_starts_from_and_refers_to_the_sft_adapter(tmp_path, tiny_model, tiny_config):
    from tunelab.models import load_for_inference

    sft = tmp_path / "sft"
    assert main(["train", str(tiny_config), "--output", str(sft), "--set", "data.test_size=0"]) == 0
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    outs = {}
    for name, model in (("from_base", tiny_model), ("from_sft", sft)):
        cfg = method_config(tmp_path, model, pairs, "dpo", steps=2)
        outs[name] = tmp_path / name
        assert main(["train", str(cfg), "--output", str(outs[name])]) == 0
    first = {k: next(h for h in _history(o) if "logps/chosen" in h) for k, o in outs.items()}
    # the reference is the start point (margin 0 at step 1), and the start point is the SFT model
    assert abs(first["from_sft"]["rewards/margins"]) < 1e-4
    assert first["from_sft"]["logps/chosen"] != pytest.approx(first["from_base"]["logps/chosen"], abs=1e-3)
    loaded = load_for_inference(str(outs["from_sft"]))  # the eval/generate/serve path: base + the DPO adapter
    assert loaded.adapter == outs["from_sft"] / "final"


def test_dpo_from_run_of_a_different_base_is_refused(tmp_path, tiny_model, tiny_config, capsys):
    import shutil

    from tiny import build_tiny_model

    sft = tmp_path / "sft"
    assert main(["train", str(tiny_config), "--output", str(sft), "--set", "data.test_size=0",
                 "--set", "train.max_steps=1", "--set", "train.save_steps=1"]) == 0
    other = build_tiny_model(tmp_path / "other")
    cfg_text = (sft / "config.yaml").read_text()
    (sft / "config.yaml").write_text(cfg_text.replace(str(tiny_model), str(other)))
    import json as _json

    conf = _json.loads((other / "config.json").read_text())
    conf["hidden_size"], conf["intermediate_size"] = 32, 64
    (other / "config.json").write_text(_json.dumps(conf))
    cfg = method_config(tmp_path, sft, write_pairs(tmp_path / "pairs.jsonl"), "dpo")
    out = tmp_path / "dpo"
    assert main(["train", str(cfg), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "different base" in err and "Traceback" not in err and not out.exists()
    shutil.rmtree(other)


# --- GRPO -----------------------------------------------------------------------------------


REWARDS = '''
def vowels(prompts, completions, **kw):
    return [sum(c in "aeiou" for c in t) / max(1, len(t)) for t in completions]


def boom(prompts, completions, output=None, **kw):
    if any("17" in p for p in prompts):
        raise ValueError("no seventeens")
    return [0.0] * len(completions)
'''


def test_grpo_mean_reward_rises_on_a_toy_verifiable_task(tmp_path, tiny_model, alpaca_file):
    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    cfg = method_config(tmp_path, tiny_model, alpaca_file, "grpo", steps=10, extra="""
grpo:
  rewards: [toy_rewards:vowels]
  num_generations: 4
  max_completion_length: 8
""")
    out = tmp_path / "grpo"
    # full fine-tune: on this random 2-layer model the toy reward rises only through the (tied) output head,
    # which LoRA leaves frozen: with LoRA, or full with the head frozen, it stays flat (README, GRPO)
    assert main(["train", str(cfg), "--output", str(out), "--set", "train.per_device_train_batch_size=8",
                 "--set", "lora.enabled=false", "--set", "train.learning_rate=3e-2"]) == 0
    rewards = [h["reward"] for h in _history(out) if "reward" in h]
    assert len(rewards) == 10
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2


def test_task_file_reward_scores_like_eval(tmp_path):
    from tunelab.methods.grpo import _task_reward

    (tmp_path / "t.jsonl").write_text('{"q": "x", "a": "42"}\n')
    (tmp_path / "t.yaml").write_text("kind: generate\npath: t.jsonl\ncontext: '{q}'\ntarget: '{a}'\n"
                                     "regex: '\\A\\s*([^\\n]+)'\nstop: ['\\n']\n")
    fn = _task_reward(tmp_path / "t.yaml", "output")
    got = fn(["p"] * 4, ["42", " 42\nmore", "41", "42.0"], a=["42"] * 4, output=["42"] * 4)
    assert got == [1.0, 1.0, 0.0, 1.0]


# --- bad input: one line, exit 2, nothing written -------------------------------------------


def _refused(capsys, out: Path, *needles):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert lines and "Traceback" not in err, err[-1500:]
    flat = err.replace("\n", " ")
    for n in needles:
        assert n in flat, flat[-1500:]
    assert not out.exists()


def test_bad_method_inputs_exit_2_and_write_nothing(tmp_path, tiny_model, alpaca_file, tiny_config, capsys):
    out = tmp_path / "out"
    # a preference file without chosen/rejected names the fields it has
    cfg = method_config(tmp_path, tiny_model, alpaca_file, "dpo")
    assert main(["train", str(cfg), "--output", str(out)]) == 2
    _refused(capsys, out, "chosen and rejected", "instruction, output")
    # a method key in another method's run
    assert main(["train", str(tiny_config), "--output", str(out), "--set", "dpo.beta=0.5"]) == 2
    _refused(capsys, out, "dpo.beta is a dpo setting, but train.method is sft")
    assert main(["train", str(tiny_config), "--output", str(out), "--set", "dpo.betta=0.5"]) == 2
    _refused(capsys, out, "did you mean 'beta'")
    # rewards: not importable, raising (names it and the row), a task that is not generative
    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"Say {n}.", "output": str(n)}) for n in (3, 17, 5, 8)))
    mc = tmp_path / "mc.yaml"
    mc.write_text("kind: multiple_choice\npath: mc.jsonl\ncontext: '{q}'\nchoices: [a, b]\ngold: 0\n")
    (tmp_path / "mc.jsonl").write_text('{"q": "x"}\n')
    for reward, needles in (("toy_rewards:nope", ["can't import reward 'toy_rewards:nope'", "AttributeError"]),
                            ("no_such_module:f", ["can't import reward", "ModuleNotFoundError"]),
                            ("toy_rewards:boom", ["reward 'toy_rewards:boom' raised ValueError: no seventeens",
                                                  "on row", "prompts.jsonl:2"]),
                            (str(mc), ["multiple_choice task", "kind: generate"])):
        cfg = method_config(tmp_path, tiny_model, prompts, "grpo",
                            extra=f"grpo:\n  rewards: ['{reward}']\n  num_generations: 2")
        assert main(["train", str(cfg), "--output", str(out), "--set", "data.shuffle=false"]) == 2
        _refused(capsys, out, *needles)


# --- KTO, ORPO, SimPO, reward, classify -----------------------------------------------------


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo", "reward"])
def test_other_methods_loss_falls_on_a_toy_set(tmp_path, tiny_model, method):
    data = write_pairs(tmp_path / "pairs.jsonl")
    extra = ""
    if method == "kto":
        rows = [json.loads(l) for l in data.read_text().splitlines()]
        unpaired = [{"prompt": r["instruction"], "completion": r["chosen"] if i % 2 else r["rejected"],
                     "label": bool(i % 2)} for i, r in enumerate(rows)]
        data.write_text("\n".join(json.dumps(r) for r in unpaired))
        extra = "kto:\n  beta: 0.5"  # a KTO key in a KTO run is fine
    cfg = method_config(tmp_path, tiny_model, data, method, extra=extra, steps=6)
    out = tmp_path / method
    sets = ["--set", "data.format=prompt_completion"] if method == "kto" else []
    assert main(["train", str(cfg), "--output", str(out)] + sets) == 0
    losses = [h["loss"] for h in _history(out) if "loss" in h]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_method"] == method and (out / "final" / "adapter_model.safetensors").is_file()
    if method == "reward":
        assert summary["last_accuracy"] >= 0.75  # RewardTrainer: chosen scored above rejected


def test_classify_on_real_csv_rows(tmp_path, tiny_model, capsys):
    from safetensors.torch import load_file

    csv_path = SHARED / "train" / "korean_chatbot" / "ChatbotData.csv"
    if not csv_path.is_file():
        pytest.skip("shared ChatbotData.csv not present")
    cfg = method_config(tmp_path, tiny_model, csv_path, "classify", steps=4,
                        extra="classify:\n  text_field: Q\n  label_field: label")
    out = tmp_path / "cls"
    assert main(["train", str(cfg), "--output", str(out), "--set", "data.max_rows=200",
                 "--set", "data.test_size=0.2"]) == 0
    assert "3 labels" in capsys.readouterr().err
    w = load_file(out / "final" / "adapter_model.safetensors")
    assert any("score" in k for k in w) and any("lora_A" in k for k in w)  # the head is trained and saved
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_eval_accuracy"] is not None
    lo, hi = summary["eval_accuracy_ci95"]
    assert summary["eval_rows"] == 40 and lo <= summary["eval_accuracy"] <= hi and hi - lo > 0
    # one label only: refused before anything is written
    one = tmp_path / "one.csv"
    one.write_text("Q,label\nhello,1\nbye,1\n")
    out2 = tmp_path / "one"
    assert main(["train", str(cfg), "--output", str(out2), "--set", f"data.path={one}"]) == 2
    _refused(capsys, out2, "has one label (1)", "at least two")


def test_method_section_in_another_methods_run_is_refused_even_at_defaults(tmp_path, tiny_config, capsys):
    """`dpo: {beta: 0.1}` (beta's default) in an SFT run: the YAML was meant for DPO; its presence is the error."""
    import yaml

    from tunelab.config import load_config, save_config

    out = tmp_path / "out"
    base = tiny_config.read_text()
    for extra, needles in (("dpo:\n  beta: 0.1\n", ["run.yaml:", "dpo.beta is a dpo setting, but train.method is sft"]),
                           ("grpo:\n  num_generations: 4\n", ["grpo.num_generations is a grpo setting"]),
                           ("kto: {}\n", ["the kto: section is for train.method=kto, but train.method is sft"])):
        tiny_config.write_text(base + extra)
        assert main(["train", str(tiny_config), "--output", str(out)]) == 2
        _refused(capsys, out, *needles)
    tiny_config.write_text(base)
    assert main(["train", str(tiny_config), "--output", str(out), "--set", "dpo.beta=0.1"]) == 2
    _refused(capsys, out, "--set: dpo.beta is a dpo setting, but train.method is sft")
    # the section of the run's own method is fine, and a saved run config (or `tunelab config`'s output)
    # holds only that one, so it loads back as a valid config
    cfg, _ = load_config(tiny_config, ["train.method=dpo", "dpo.beta=0.1"])
    save_config(cfg, tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert "dpo" in saved and not {"kto", "orpo", "simpo", "grpo", "classify"} & set(saved)
    assert load_config(tmp_path / "saved.yaml")[0].dpo.beta == 0.1
    cfg, _ = load_config(tiny_config)
    save_config(cfg, tmp_path / "sft.yaml")
    assert "dpo" not in yaml.safe_load((tmp_path / "sft.yaml").read_text())
    load_config(tmp_path / "sft.yaml")


def test_classify_on_a_column_with_one_label_is_refused(tmp_path, tiny_model, capsys):
    one = tmp_path / "one.csv"
    one.write_text("text,label\nhello,1\nbye,1\nagain,1\n")
    cfg = method_config(tmp_path, tiny_model, one, "classify")
    out = tmp_path / "cls"
    assert main(["train", str(cfg), "--output", str(out)]) == 2
    _refused(capsys, out, "column 'label' has one label (1) in 3 rows", "at least two")
    assert main(["check", str(cfg)]) == 2
    _refused(capsys, out, "has one label")


# --- tunelab eval of classify and reward runs ------------------------------------------------


def _sentiment(path: Path, n: int, seed: int, text: str = "text", label: str = "label") -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = i % 2
        w = rng.choice(["good", "great", "fine"] if pos else ["bad", "awful", "poor"])
        rows.append({text: f"this is {w} {rng.choice(['food', 'day', 'film', 'car', 'view'])}",
                     label: "pos" if pos else "neg"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_eval_of_classify_and_reward_runs(tmp_path, tiny_model, tiny_config, capsys):
    """`tunelab eval RUN... --tasks task.yaml`: a classify run on `kind: classify` rows (accuracy, macro-F1, 95% CI,
    paired difference), a reward run on `kind: preference` pairs; any other pairing is one line, exit 2."""
    cfg = method_config(tmp_path, tiny_model, _sentiment(tmp_path / "train.jsonl", 80, 0), "classify", steps=20)
    runs = {}
    for name, steps in (("cls1", 1), ("cls", 20)):
        runs[name] = tmp_path / name
        assert main(["train", str(cfg), "--output", str(runs[name]), "--set", "train.learning_rate=3e-3",
                     "--set", f"train.max_steps={steps}", "--set", "data.test_size=0"]) == 0
    _sentiment(tmp_path / "held.jsonl", 40, 7, text="sentence", label="y")  # other rows, other column names
    task = tmp_path / "held.yaml"
    task.write_text("kind: classify\npath: held.jsonl\ntext: '{sentence}'\nlabel: '{y}'\n")
    capsys.readouterr()
    ev = tmp_path / "ev"
    assert main(["eval", str(runs["cls1"]), str(runs["cls"]), "--tasks", str(task), "--no-cache", "--out", str(ev)]) == 0
    out = capsys.readouterr().out
    assert "held (n=40" in out and "acc" in out and "f1" in out and "Δ" in out
    res = json.loads((ev / "results.json").read_text())
    acc, lo, hi = res["models"][str(runs["cls"])]["held"]["metrics"]["acc"]
    assert lo > 0.6 and lo <= acc <= hi, (acc, lo, hi)  # a trained head beats chance (0.5) on held-out rows
    d = res["diffs"][str(runs["cls"])]["held"]
    assert d["metric"] == "acc" and d["diff"][1] > 0  # and beats the 1-step run, paired on the same items
    assert res["models"][str(runs["cls"])]["held"]["per_item"]["outputs"][:2] == ["neg", "pos"]

    # a reward run on held-out pairs in its training format: chosen scored above rejected
    rw_cfg = method_config(tmp_path, tiny_model, write_pairs(tmp_path / "pairs.jsonl"), "reward", steps=6)
    rw = tmp_path / "rw"
    assert main(["train", str(rw_cfg), "--output", str(rw), "--set", "data.test_size=0"]) == 0
    write_pairs(tmp_path / "held_pairs.jsonl", n=30, seed=5)
    (tmp_path / "pairs.yaml").write_text("kind: preference\npath: held_pairs.jsonl\n")
    assert main(["eval", str(rw), "--tasks", str(tmp_path / "pairs.yaml"), "--no-cache", "--out", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    acc, lo, _ = res["models"][str(rw)]["pairs"]["metrics"]["acc"]
    assert lo > 0.5, acc

    # wrong pairings, before any model is loaded
    sft = tmp_path / "sft"
    assert main(["train", str(tiny_config), "--output", str(sft), "--set", "train.max_steps=1"]) == 0
    gen = tmp_path / "gen.yaml"
    gen.write_text("kind: generate\npath: held.jsonl\ncontext: '{sentence}'\ntarget: '{y}'\n")
    capsys.readouterr()
    for models, tasks, needle in (([str(sft)], task, "task held (kind: classify) scores a train.method=classify run, "
                                                     f"and {sft} is a causal language model"),
                                  ([str(runs["cls"]), str(sft)], task, "is a causal language model"),
                                  ([str(runs["cls"])], gen, "can be evaluated on `kind: classify` tasks only"),
                                  ([str(rw)], task, "train.method=reward run")):
        assert main(["eval", *models, "--tasks", str(tasks), "--no-cache"]) == 2
        err = capsys.readouterr().err
        assert needle in err.replace("\n", " ") and "Traceback" not in err, err[-1500:]
