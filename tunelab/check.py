"""`tunelab check`: the preflight report, printed. Exit 2 when a fatal finding is present."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from .config import load_config
from .data.preflight import check_examples, render_spans
from .models import context_window, dtype_warning
from .train import setup_data
from .ui import console


def check(args) -> int:
    cfg, warnings = load_config(args.config, args.overrides)
    if cfg.train.method != "sft":  # preference pairs, GRPO prompts and rewards, classifier rows
        from .methods.run import check_method

        return check_method(cfg, args.config, warnings, args.examples)
    s = setup_data(cfg, Path(args.config).resolve().parent)
    report = check_examples(s)
    tok, st = s.tokenizer, s.stats

    t = Table(title=f"tunelab check {args.config}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", f"{cfg.model.name} -> {s.model_folder}")
    t.add_row("context", f"{context_window(s.model_folder)} tokens; data.max_seq_length {cfg.data.max_seq_length}")
    t.add_row("device", f"{s.device}, compute dtype {str(s.dtype).replace('torch.', '')}")
    t.add_row("tokens", f"eos {tok.eos_token!r} ({tok.eos_token_id}), pad {tok.pad_token!r} ({tok.pad_token_id}), "
                        f"bos {tok.bos_token!r}" + (f"\n{s.pad_note}" if s.pad_note else ""))
    t.add_row("rows", f"read {st.rows_read}, kept {st.rows_kept} (train {st.train_rows}, eval {st.eval_rows}), "
                      f"dropped {sum(st.dropped.values())}")
    for reason, n in st.dropped.items():
        t.add_row("  dropped", f"{n}: {reason} (e.g. {', '.join(st.dropped_examples[reason])})")
    if st.mix:  # data.sources
        from .datatools.mix import describe

        t.add_row("mix", describe(st))
    pct = st.length_percentiles
    t.add_row("lengths", ", ".join(f"{k} {v}" for k, v in pct.items()) + " tokens")
    t.add_row("truncated", f"{st.truncated} longer than max_seq_length; {st.response_cut_away} with the response "
                           f"cut away entirely")
    if cfg.data.template == "chat_template":
        t.add_row("trained", f"data.train_on {cfg.data.train_on}: "
                             + ("every assistant turn" if cfg.data.train_on == "all_assistant" else
                                "the last assistant turn; earlier turns are context"))
    t.add_row("tokens", f"{st.total_tokens:,} in training rows, {st.trained_tokens:,} trained "
                        f"({100 * st.trained_tokens / max(1, st.total_tokens):.1f}%)")
    console.print(t)

    for ex in s.train[: max(0, args.examples)]:
        text = Text()
        for piece, trained in render_spans(tok, ex):
            if trained:
                text.append("▶", style="bold green")
                text.append(piece, style="bold green")
                text.append("◀", style="bold green")
            else:
                text.append(piece, style="dim")
        spans = len(ex.turn_starts)
        console.print(f"[bold]example[/bold] {ex.where} ({len(ex.input_ids)} tokens, {ex.n_trained} trained"
                      f"{f' in {spans} turns' if spans > 1 else ''}, each trained span marked ▶...◀; masked text dim; "
                      f"special tokens as ⟦...⟧):")
        console.print(text, soft_wrap=True)

    dw = dtype_warning(s.dtype, s.device)
    from .datatools.decontaminate import overlap_warning

    ow = overlap_warning(cfg, Path(args.config).resolve().parent)  # training data vs eval.tasks
    for w in warnings + report.warnings + ([dw] if dw else []) + ([ow] if ow else []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    for e in report.errors:
        console.print(f"[red]error:[/red] {e}")
    if report.errors:
        return 2
    console.print("[green]preflight passed[/green]")
    return 0
