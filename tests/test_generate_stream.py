"""Token-by-token output of a single prompt (what `tunelab generate` shows on a terminal)."""

import pytest

from tunelab.generate import GenParams, generate, generate_batch
from tunelab.models import load_for_inference


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_for_inference(str(tiny_model))


def test_streamed_pieces_add_up_to_the_completion(loaded):
    pieces = []
    plain = generate_batch(loaded, ["Add 1 and 2."], GenParams(max_new_tokens=24))[0]
    got = generate_batch(loaded, ["Add 1 and 2."], GenParams(max_new_tokens=24), stream=pieces.append)[0]
    assert got.text == plain.text and "".join(pieces) == got.text
    assert len(pieces) > 1 or len(got.text.split()) <= 1  # it really came in pieces


def test_stream_never_shows_the_stop_string(loaded):
    free = generate_batch(loaded, ["Add 1 and 2."], GenParams(max_new_tokens=24))[0].text
    if len(free) < 6:
        pytest.skip("random tiny model produced too little text")
    stop = free[3:6]
    pieces = []
    got = generate_batch(loaded, ["Add 1 and 2."], GenParams(max_new_tokens=24, stop=[stop]), stream=pieces.append)[0]
    assert "".join(pieces) == got.text and stop not in got.text and free.startswith(got.text)


def test_several_prompts_are_not_token_streamed(loaded):
    pieces = []
    out = generate(loaded, ["Hi", "Add 1 and 2."], GenParams(max_new_tokens=8), stream=pieces.append)
    assert pieces == [] and len(out) == 2
