"""A tiny random Llama and a small tokenizer, built in seconds, for unit tests.

The tokenizer copies SmolLM2's special-token layout, including the trap: pad == eos.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("the a of to and in is it that for on with as was be by at this are from or an have not one all they "
         "we you can more what when which there their will about if up out so said do its into than then two "
         "add sum answer number capital city country response instruction task write below describes request "
         "completes appropriately paired input provides further context plus minus equals").split()


def corpus() -> list[str]:
    from tunelab.data.templates import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT

    rng = random.Random(0)
    lines = [ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT]
    for _ in range(400):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + f" {rng.randint(0, 999)}.")
    return lines


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return tok


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def write_alpaca(path: Path, n: int = 40, seed: int = 0, with_input: int = 0) -> Path:
    """Arithmetic instructions in Alpaca format (data this project makes itself)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        row = {"instruction": f"Add {a} and {b}.", "input": "", "output": f"The answer is {a + b}."}
        if i < with_input:
            row = {"instruction": "Add the two numbers.", "input": f"{a} {b}", "output": f"The answer is {a + b}."}
        rows.append(row)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
