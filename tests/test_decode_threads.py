"""generate_batch decodes on the thread count decode_threads measures to be faster right now (issue 16.5):
on a busy CPU every tiny decoding matmul with several threads waits for all of them to be scheduled."""

import types

import pytest
import torch

from tunelab import generate as gen
from tunelab.generate import GenParams, decode_threads, generate_batch
from tunelab.models import load_for_inference


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_for_inference(str(tiny_model))


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _clock(seconds_per_matmul):
    """A fake time module whose clock advances by seconds_per_matmul(threads) per perf_counter pair."""
    state = {"t": 0.0, "calls": 0}

    def perf_counter():
        state["calls"] += 1
        if state["calls"] % 2 == 0:  # the end of a timed matmul
            state["t"] += seconds_per_matmul(torch.get_num_threads())
        return state["t"]

    return types.SimpleNamespace(perf_counter=perf_counter)


def test_decode_threads_keeps_the_faster_count(monkeypatch, loaded, two_threads):
    monkeypatch.setattr(gen, "time", _clock(lambda n: 0.02 if n > 1 else 0.001))  # busy machine
    assert decode_threads(loaded.model, 1) == 1
    monkeypatch.setattr(gen, "time", _clock(lambda n: 0.001 if n > 1 else 0.002))  # idle machine
    assert decode_threads(loaded.model, 1) == 2
    assert torch.get_num_threads() == 2  # the probe leaves the count as it found it


def test_generate_batch_decodes_on_the_chosen_threads_and_restores(monkeypatch, loaded, two_threads):
    seen = []
    hook = loaded.model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    params = GenParams(max_new_tokens=5, do_sample=True, temperature=1.0, seed=3)
    try:
        monkeypatch.setattr(gen, "decode_threads", lambda model, rows: 1)
        one = generate_batch(loaded, ["Add 1 and 2."], params)[0].text
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(gen, "decode_threads", lambda model, rows: 2)
        two = generate_batch(loaded, ["Add 1 and 2."], params)[0].text
        assert set(seen) == {2}
    finally:
        hook.remove()
    assert one == two  # the same seeded sample whatever the thread count
