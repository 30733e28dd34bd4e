"""Sequence classification heads: `classify` (text/label columns, transformers' Trainer) and `reward`
(a scalar reward model on chosen/rejected pairs, trl.RewardTrainer).

Both load AutoModelForSequenceClassification on the base and wrap it in LoRA with task_type SEQ_CLS
(peft then trains the new `score` head in full, not through the adapter). The head starts random:
the recipe's notes show an untrained head giving random labels, and this is its remedy. The pad
token is set on the model config: Llama-style classifiers find each row's last real token with it.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.sources import DataError, read_rows
from ..models import ModelError
from ..ui import console
from .run import Guarded, MethodSetup, args_for, callbacks


@dataclass
class LabelStats:
    rows_read: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    labels: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def load_labelled(cfg, tokenizer, base: Path | None = None):
    """Rows of text (+ optional text pair) and a label -> tokenized examples; labels mapped to 0..K-1."""
    from ..data.preference import split_train_eval

    c, d = cfg.classify, cfg.data
    stats = LabelStats()

    class _S:  # split_train_eval counts drops on this
        def drop(self, reason, where):
            stats.dropped[reason] = stats.dropped.get(reason, 0) + 1

    def read(path):
        rows = read_rows(path, d.split, base)
        stats.rows_read += len(rows)
        out = []
        for row in rows:
            where = f"{path}:{row.get('__line__', '?')}"
            for col in (c.text_field, c.label_field) + ((c.text_pair_field,) if c.text_pair_field else ()):
                if col not in row:
                    have = sorted(k for k in row if k != "__line__")
                    raise DataError(f"{where}: no column '{col}' (the file has: {', '.join(have)}); set "
                                    f"classify.text_field / classify.label_field")
            text = str(row[c.text_field] or "")
            if not text.strip():
                stats.dropped["empty text"] = stats.dropped.get("empty text", 0) + 1
                continue
            label = row[c.label_field]
            if isinstance(label, str) and label.strip().lstrip("-").isdigit():
                label = int(label)
            out.append((where, text, str(row[c.text_pair_field]) if c.text_pair_field else None, label))
        return out

    items = read(d.path)
    counts = collections.Counter(x[3] for x in items)
    if len(counts) < 2:
        only = next(iter(counts), None)
        raise DataError(f"{d.path}: column '{c.label_field}' has one label ({only!r}) in {len(items)} rows; "
                        f"a classifier needs at least two")
    try:
        labels = sorted(counts)
    except TypeError:
        labels = sorted(counts, key=str)
    index = {v: i for i, v in enumerate(labels)}
    train, evals = split_train_eval(d, items, [x[0] for x in items], _S())
    if d.eval_path:
        evals = read(d.eval_path)

    def tok_all(xs):
        out = []
        for where, text, pair, label in xs:
            if label not in index:
                raise DataError(f"{where}: label {label!r} does not occur in the training data ({labels})")
            enc = tokenizer(text, pair, truncation=True, max_length=d.max_seq_length) if pair is not None else \
                tokenizer(text, truncation=True, max_length=d.max_seq_length)
            out.append({"input_ids": enc["input_ids"], "labels": index[label]})
        return out

    tr, ev = tok_all(train), tok_all(evals)
    stats.train_rows, stats.eval_rows = len(tr), len(ev)
    stats.labels, stats.counts = [str(x) for x in labels], {str(k): v for k, v in counts.items()}
    return tr, ev, stats


def load_seq_cls(s: MethodSetup, num_labels: int):
    """The base as AutoModelForSequenceClassification (+ LoRA SEQ_CLS, the head trained in full)."""
    from transformers import AutoModelForSequenceClassification

    cfg = s.cfg
    kwargs = dict(num_labels=num_labels, dtype=s.dtype, attn_implementation=cfg.model.attn_implementation)
    if num_labels > 1:
        labels = s.stats.labels
        kwargs.update(id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    q = cfg.quantization
    if q.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=s.dtype if q.compute_dtype == "auto" else getattr(torch, q.compute_dtype))
        kwargs["device_map"] = {"": 0} if s.device == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(s.start.base_folder), **kwargs)
    except Exception as e:
        raise ModelError(f"{s.start.base_folder} can't be loaded as a sequence classifier ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if not q.load_in_4bit:
        model.to(s.device)
    if len(s.tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(s.tokenizer), mean_resizing=True)
    model.config.pad_token_id = s.tokenizer.pad_token_id  # the classifier pools the last non-pad token
    model.config.use_cache = False
    if q.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
                                                 task_type="SEQ_CLS", target_modules=list(lc.target_modules),
                                                 use_dora=lc.use_dora))
    return model


def make_classify_trainer(model, out: Path, s: MethodSetup):
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class T(Guarded, Trainer):
        pass

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, axis=-1) == p.label_ids).mean())}

    args = args_for(s.cfg, out, s, None)
    trainer = T(model=model, args=args, train_dataset=s.train, eval_dataset=s.evals or None,
                data_collator=DataCollatorWithPadding(s.tokenizer), processing_class=s.tokenizer,
                compute_metrics=accuracy, callbacks=callbacks(s.cfg, out))
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    console.print(f"[dim]classify: {len(s.stats.labels)} labels {s.stats.counts}[/dim]")
    return trainer


def make_reward_trainer(model, out: Path, s: MethodSetup):
    import datasets
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import RewardConfig, RewardTrainer

    class T(Guarded, RewardTrainer):
        pass

    # chosen/rejected are scored as whole sequences (prompt + response + EOS), tokenized by tunelab
    rows = lambda xs: datasets.Dataset.from_list(  # noqa: E731
        [{"chosen_ids": x.prompt_ids + x.chosen_ids, "rejected_ids": x.prompt_ids + x.rejected_ids} for x in xs]) \
        if xs else None
    args = args_for(s.cfg, out, s, RewardConfig, max_length=s.cfg.data.max_seq_length, disable_dropout=True)
    trainer = T(model=model, args=args, train_dataset=rows(s.train), eval_dataset=rows(s.evals),
                processing_class=s.tokenizer, callbacks=callbacks(s.cfg, out))
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return trainer


def held_out_accuracy(trainer, s: MethodSetup) -> dict:
    """Accuracy on the held-out rows with a 95% bootstrap CI (tunelab/evaluate/stats.py, as `tunelab eval`),
    and the share of the majority label there (what an untrained, constant classifier would score)."""
    import numpy as np

    from ..evaluate.stats import bootstrap_ci

    pred = trainer.predict(s.evals)
    correct = (np.argmax(pred.predictions, axis=-1) == pred.label_ids).astype(float)
    acc, lo, hi = bootstrap_ci(correct)
    majority = collections.Counter(pred.label_ids.tolist()).most_common(1)[0][1] / len(pred.label_ids)
    return {"eval_accuracy": round(acc, 4), "eval_accuracy_ci95": [round(lo, 4), round(hi, 4)],
            "eval_rows": len(correct), "eval_majority_label_share": round(majority, 4)}


# ---------------------------------------------------------------------------------------------
# `tunelab eval` of a classify or reward run (tasks of kind classify / preference, tunelab/evaluate)


def head_method(spec: str) -> str | None:
    """'classify' or 'reward' when `spec` is a run folder (or one of its checkpoints) trained with a
    classification head, else None (a model spec, a causal-LM run). Reads only the run's config.yaml."""
    from ..rundir import find_run, run_config

    p = Path(spec).expanduser()
    if not p.is_dir():
        return None
    run, _ = find_run(p)
    if run is None:
        return None
    method = run_config(run).train.method
    return method if method in ("classify", "reward") else None


@dataclass
class Head:
    """A classify/reward run loaded for evaluation."""

    model: object
    tokenizer: object
    labels: list[str]
    cfg: object
    name: str
    device: str


def load_head(spec: str, device: str = "auto") -> Head:
    """The run's AutoModelForSequenceClassification as training built it (base + its SEQ_CLS adapter, whose
    saved modules include the trained head; or a full fine-tune's weights), in eval mode."""
    import json

    from transformers import AutoModelForSequenceClassification

    from ..models import check_adapter_base, load_tokenizer, pick_device, pick_dtype
    from ..rundir import find_run, run_config
    from .run import resolve_start

    run, weights = find_run(Path(spec).expanduser())
    rc = run_config(run)
    method = rc.train.method
    labels = [] if method == "reward" else json.loads((run / "data_stats.json").read_text())["labels"]
    dev = pick_device(device)
    dt = pick_dtype(rc.model.dtype, dev)
    full = (weights / "config.json").is_file() and not (weights / "adapter_config.json").is_file()
    base = weights if full else resolve_start(rc.model.name, rc.model.revision).base_folder
    tok, _ = load_tokenizer(weights if (weights / "tokenizer_config.json").is_file() else base, rc.model.pad_token)
    kwargs = {} if full else dict(num_labels=1 if method == "reward" else len(labels))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base), dtype=dt, attn_implementation=rc.model.attn_implementation, **kwargs)
    except Exception as e:
        raise ModelError(f"{base} can't be loaded as a sequence classifier ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=True)  # as load_seq_cls did before training
    model.config.pad_token_id = tok.pad_token_id
    if not full:
        from peft import PeftModel

        check_adapter_base(weights, base)
        try:
            model = PeftModel.from_pretrained(model, str(weights))
        except Exception as e:
            raise ModelError(f"adapter {weights} can't be applied ({str(e).splitlines()[0][:200]})") from None
    model.to(dev).eval()
    return Head(model, tok, labels, rc, str(weights), dev)


def _scores(head: Head, batches, max_length: int) -> list:
    """Logits row by row; `batches` yields (texts, pairs or None) or lists of token ids."""
    out = []
    for batch in batches:
        if isinstance(batch, tuple):
            texts, pairs = batch
            enc = head.tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True,
                                 return_tensors="pt")
        else:
            enc = head.tokenizer.pad({"input_ids": [ids[:max_length] for ids in batch]}, return_tensors="pt")
        with torch.no_grad():
            out += head.model(**enc.to(head.device)).logits.float().tolist()
    return out


def score_classify(head: Head, task, items, batch_size: int, advance) -> dict:
    """Per-item accuracy (+ gold/pred indices for macro-F1) of a classify run on text/label items; the text
    is tokenized as training tokenized it (text [, pair], truncated at the run's data.max_seq_length)."""
    from ..evaluate.tasks import TaskError

    index = {v: i for i, v in enumerate(head.labels)}
    for n, it in enumerate(items):
        if it.target not in index:
            raise TaskError(f"task {task.name}: item {n + 1} has label {it.target!r}, which {head.name} was not "
                            f"trained on (its labels: {', '.join(head.labels)})")

    def batches():
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            pairs = [it.text_pair or "" for it in chunk] if any(it.text_pair is not None for it in chunk) else None
            yield [it.context for it in chunk], pairs
            advance(len(chunk))

    logits = _scores(head, batches(), head.cfg.data.max_seq_length)
    pred = [max(range(len(row)), key=row.__getitem__) for row in logits]
    gold = [index[it.target] for it in items]
    return {"acc": [float(p == g) for p, g in zip(pred, gold)], "gold": gold, "pred": pred,
            "outputs": [head.labels[p] for p in pred]}


def score_preference(head: Head, task, items, batch_size: int, advance) -> dict:
    """Per-pair accuracy of a reward run: 1 when it scores chosen above rejected. The rows are read and
    tokenized with the run's own data settings (format, fields, template, EOS), as RewardTrainer saw them
    (a pair longer than data.max_seq_length is cut there; RewardTrainer leaves such pairs out of training)."""
    import dataclasses

    from ..data.preference import PairStats, to_pair, tokenize_pairs
    from ..evaluate.tasks import TaskError

    d = dataclasses.replace(head.cfg.data, drop_untrainable=False)  # a pair that can't be scored is an error
    try:
        pairs = [to_pair(it.row, d, it.context) for it in items]
        tok = tokenize_pairs(d, head.tokenizer, pairs, PairStats(), count=False)
    except DataError as e:
        raise TaskError(f"task {task.name}: {e}") from None
    seqs = [x for t in tok for x in (t.prompt_ids + t.chosen_ids, t.prompt_ids + t.rejected_ids)]

    def batches():
        for s in range(0, len(seqs), 2 * batch_size):
            yield seqs[s:s + 2 * batch_size]
            advance(len(seqs[s:s + 2 * batch_size]) // 2)

    r = [row[0] for row in _scores(head, batches(), d.max_seq_length)]
    margins = [r[2 * i] - r[2 * i + 1] for i in range(len(tok))]
    return {"acc": [float(m > 0) for m in margins], "margin": margins}
