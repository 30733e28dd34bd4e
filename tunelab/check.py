"""`tunelab check`: the preflight report, printed. Exit 2 when a fatal finding is present."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from .config import load_config
from .data.preflight import check_examples, render_trained_span
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
    pct = st.length_percentiles
    t.add_row("lengths", ", ".join(f"{k} {v}" for k, v in pct.items()) + " tokens")
    t.add_row("truncated", f"{st.truncated} longer than max_seq_length; {st.response_cut_away} with the response "
                           f"cut away entirely")
    t.add_row("tokens", f"{st.total_tokens:,} in training rows, {st.trained_tokens:,} trained "
                        f"({100 * st.trained_tokens / max(1, st.total_tokens):.1f}%)")
    console.print(t)

    for ex in s.train[: max(0, args.examples)]:
        prompt, trained = render_trained_span(tok, ex)
        text = Text()
        text.append(prompt, style="dim")
        text.append("▶", style="bold green")
        text.append(trained, style="bold green")
        text.append("◀", style="bold green")
        console.print(f"[bold]example[/bold] ({len(ex.input_ids)} tokens, {ex.n_trained} trained, "
                      f"marked ▶...◀; masked prompt dim; special tokens as ⟦...⟧):")
        console.print(text, soft_wrap=True)

    dw = dtype_warning(s.dtype, s.device)
    for w in warnings + report.warnings + ([dw] if dw else []):
        console.print(f"[yellow]warning:[/yellow] {w}")
    for e in report.errors:
        console.print(f"[red]error:[/red] {e}")
    if report.errors:
        return 2
    console.print("[green]preflight passed[/green]")
    return 0
