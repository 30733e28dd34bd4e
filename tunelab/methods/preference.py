"""Preference tuning on TRL's trainers: DPO (trl.DPOTrainer), KTO (trl.KTOTrainer), ORPO and SimPO
(trl.experimental: ORPOTrainer, CPOTrainer with loss_type=simpo). No loss is written here.

Reference model without a second copy: the policy is a PEFT model and no `ref_model` is passed, so
TRL computes the reference with the adapter disabled (a fresh LoRA: the base) or, when the run
starts from a finished run's adapter (`model.name: runs/sft`), with a frozen copy of that adapter
(TRL's "ref" adapter: adapter-sized, not a model copy). TRL logs rewards/chosen, rewards/rejected,
rewards/margins and rewards/accuracies with every loss line, so they reach TensorBoard.
"""

from __future__ import annotations

from pathlib import Path

from ..ui import console
from .run import Guarded, MethodSetup, args_for, callbacks


def _silence_trl_warnings() -> None:
    import logging

    logging.getLogger("trl").setLevel(logging.ERROR)


def _dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows) if rows else None


def make_preference_trainer(model, out: Path, s: MethodSetup, peft_config=None):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    _silence_trl_warnings()
    cfg, method = s.cfg, s.cfg.train.method
    common = dict(max_length=cfg.data.max_seq_length, disable_dropout=True, dataset_num_proc=None)
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        class Trainer(Guarded, DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                # Private TRL hook, overridden on purpose: the rows arrive tokenized by tunelab
                # (tunelab/data/preference.py) with the SFT rules: the prompt from the one template,
                # tokenized alone, each response tokenized separately + EOS. TRL would re-tokenize
                # prompt+response jointly and cut at the common prefix instead.
                return dataset

        d = cfg.dpo
        args = args_for(cfg, out, s, DPOConfig, beta=d.beta, loss_type=list(d.loss_type), loss_weights=d.loss_weights,
                        label_smoothing=d.label_smoothing, **common)
        rows = lambda xs: [{"prompt_ids": x.prompt_ids, "chosen_ids": x.chosen_ids,  # noqa: E731
                            "rejected_ids": x.rejected_ids} for x in xs]
        trainer = Trainer(model=model, args=args, train_dataset=_dataset(rows(s.train)),
                          eval_dataset=_dataset(rows(s.evals)), processing_class=s.tokenizer,
                          callbacks=callbacks(cfg, out), peft_config=peft_config)
    elif method == "kto":
        from trl import KTOConfig, KTOTrainer

        class Trainer(Guarded, KTOTrainer):
            pass

        k = cfg.kto
        args = args_for(cfg, out, s, KTOConfig, beta=k.beta, desirable_weight=k.desirable_weight,
                        undesirable_weight=k.undesirable_weight, **common)
        # KTO's KL term pairs each row with its neighbour in a fixed-order batch, so TRL requires
        # sequential sampling; the rows were already shuffled with data.seed (data.shuffle).
        args.train_sampling_strategy = "sequential"
        # KTO tokenizes itself (its KL pairs are built while tokenizing): the prompt is tunelab's
        # rendered template text, the completion the response (TRL appends EOS).
        rows = lambda xs: [{"prompt": x.text[0], "completion": x.text[1], "label": x.label} for x in xs]  # noqa: E731
        trainer = Trainer(model=model, args=args, train_dataset=_dataset(rows(s.train)),
                          eval_dataset=_dataset(rows(s.evals)), processing_class=s.tokenizer,
                          callbacks=callbacks(cfg, out), peft_config=peft_config)
    else:  # orpo, simpo: reference-free, trl.experimental
        import os

        # tunelab pins trl and tests these trainers; the notice about experimental APIs is for library users
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        if method == "orpo":
            from trl.experimental.orpo import ORPOConfig as C
            from trl.experimental.orpo import ORPOTrainer as T

            extra = dict(beta=cfg.orpo.beta)
        else:
            from trl.experimental.cpo import CPOConfig as C
            from trl.experimental.cpo import CPOTrainer as T

            sp = cfg.simpo
            extra = dict(loss_type="simpo", beta=sp.beta, simpo_gamma=sp.gamma, cpo_alpha=sp.cpo_alpha)

        class Trainer(Guarded, T):
            pass

        args = args_for(cfg, out, s, C, max_length=cfg.data.max_seq_length, disable_dropout=True, **extra)
        eos = s.tokenizer.eos_token
        # These trainers tokenize themselves: the prompt is tunelab's rendered template text; the EOS
        # is appended here as text (ORPO/CPO, unlike DPO/KTO, do not add it).
        rows = lambda xs: [{"prompt": x.text[0], "chosen": x.text[1] + eos, "rejected": x.text[2] + eos}  # noqa: E731
                           for x in xs]
        trainer = Trainer(model=model, args=args, train_dataset=_dataset(rows(s.train)),
                          eval_dataset=_dataset(rows(s.evals)), processing_class=s.tokenizer,
                          callbacks=callbacks(cfg, out), peft_config=peft_config)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if method == "dpo":
        ref = "a frozen copy of the start adapter" if s.start.adapter else "the base (adapter disabled)"
        console.print(f"[dim]reference model: {ref}, no second model copy[/dim]")
    return trainer
