"""`tunelab chat RUN`: an interactive conversation with a model, run folder or checkpoint.

Each reply streams token by token, rendered by the run's own template through `generate.generate_batch`
(so through `templates.render_prompt`, the function training used). With a chat_template run the whole
conversation is sent each turn (history); when it outgrows the context window the oldest exchanges are
dropped, and said so. The alpaca and plain templates render one instruction, not a conversation, so
with them each message is answered on its own (single-shot) and the session says so when it starts.

Lines on stdin are the user's messages; `/reset` starts a new conversation, `/exit` (or end of input)
ends the session. Replies go to stdout, everything else to stderr, so `echo ... | tunelab chat RUN`
prints only the replies, one per message.
"""

from __future__ import annotations

import sys

from .data.templates import Example
from .generate import (
    GenerationError,
    add_decoding_args,
    check_fits,
    context_limit,
    generate_batch,
    params_from_args,
    prompt_ids,
    set_system,
)


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model or run: history, streaming, the run's template")
    p.add_argument("model", help="model spec, run folder or checkpoint")
    p.add_argument("--adapter", help="a LoRA adapter (run folder or checkpoint) to apply to MODEL")
    p.add_argument("--template", choices=["alpaca", "chat_template", "plain"],
                   help="prompt template (default: the run's; alpaca for a bare model)")
    p.add_argument("--system", help="system message (chat_template runs; replaces the run's data.system_prompt)")
    add_decoding_args(p, max_new_tokens=256)


class Session:
    """One conversation: the history (chat_template) or none (alpaca/plain), and the next reply."""

    def __init__(self, loaded, params, note=print):
        self.loaded, self.params, self.note = loaded, params, note
        self.history: list[dict] = []
        self.multi_turn = loaded.template == "chat_template"

    def reset(self) -> None:
        self.history = []

    def example(self, message: str) -> Example:
        if not self.multi_turn:
            return Example(instruction=message)
        ex = Example(messages=self.history + [{"role": "user", "content": message}])
        # the oldest exchanges go when the conversation no longer fits (the newest message always stays)
        while (len(ex.messages) > 1 and context_limit(self.loaded) is not None and
               len(prompt_ids(self.loaded, ex)) + self.params.max_new_tokens > context_limit(self.loaded)):
            ex.messages = ex.messages[2:]
            self.history = self.history[2:]
            self.note("(the oldest exchange was dropped: the conversation outgrew the context window)")
        return ex

    def reply(self, message: str, write) -> str:
        ex = self.example(message)
        check_fits(self.loaded, len(prompt_ids(self.loaded, ex)), self.params.max_new_tokens, "this message")
        text = generate_batch(self.loaded, [ex], self.params, stream=write)[0].text
        if self.multi_turn:
            self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        return text


def cmd_chat(args) -> int:
    from .models import load_for_inference
    from .ui import console

    params = params_from_args(args)
    params.validate()  # before the model loads
    loaded = load_for_inference(args.model, adapter=args.adapter, template=args.template)
    set_system(loaded, args.system)
    session = Session(loaded, params, note=lambda m: console.print(f"[dim]{m}[/dim]"))
    if session.multi_turn:
        console.print(f"[dim]chatting with {loaded.name} (template chat_template, with history); "
                      f"/reset starts over, /exit or end of input quits[/dim]")
    else:
        console.print(f"[dim]chatting with {loaded.name}: the {loaded.template} template renders one instruction, "
                      f"not a conversation, so each message is answered on its own (no history; a run trained "
                      f"with chat_template keeps it); /exit or end of input quits[/dim]")
    tty = sys.stdin.isatty()
    while True:
        try:
            line = input("you> ") if tty else sys.stdin.readline()
        except EOFError:
            break
        if not tty and not line:
            break
        message = line.rstrip("\n")
        if message.strip() in ("/exit", "/quit"):
            break
        if message.strip() == "/reset":
            session.reset()
            console.print("[dim](new conversation)[/dim]")
            continue
        if not message.strip():
            continue
        if tty:
            print("model> ", end="", flush=True)
        try:
            session.reply(message, lambda piece: print(piece, end="", flush=True))
        except GenerationError as e:  # e.g. one message longer than the context window: say it, keep chatting
            print(flush=True)
            console.print(f"[red]error:[/red] {e}")
            continue
        print(flush=True)
    return 0

