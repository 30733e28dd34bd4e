"""tunelab/rundir.py: the run folder's layout, read back the same way by every command."""

import json

import pytest

from tunelab.config import ConfigError
from tunelab.rundir import (checkpoint_step, checkpoints, find_run, newest_checkpoint, rotate_checkpoints,
                            run_config)


def _ckpt(run, step, complete=True, weights=True):
    d = run / f"checkpoint-{step}"
    d.mkdir(parents=True)
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if weights:
        (d / "adapter_config.json").write_text("{}")
    return d


def test_checkpoint_names():
    assert checkpoint_step("checkpoint-12") == 12
    for bad in ("checkpoint-", "checkpoint-x", "checkpoint-12-old", ".staging", "final"):
        assert checkpoint_step(bad) is None, bad


def test_complete_checkpoints_in_numeric_order(tmp_path):
    run = tmp_path / "run"
    for step in (9, 10, 2):
        _ckpt(run, step)
    _ckpt(run, 11, complete=False)  # a checkpoint without trainer_state.json is not one
    (run / "checkpoint-junk").mkdir()
    assert [p.name for p in checkpoints(run)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert newest_checkpoint(run).name == "checkpoint-10"
    assert newest_checkpoint(tmp_path / "none") is None


def test_rotation_keeps_newest_and_best(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3, 4, 5):
        _ckpt(run, step)
    rotate_checkpoints(run, 2, best=str(run / "checkpoint-1"))
    assert [p.name for p in checkpoints(run)] == ["checkpoint-1", "checkpoint-5"]
    rotate_checkpoints(run, None, None)  # no limit: nothing removed
    assert len(checkpoints(run)) == 2


def test_run_config_is_typed_with_defaults(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name: some/model\n")
    cfg = run_config(run)
    assert cfg.model.name == "some/model" and cfg.model.pad_token == "auto" and cfg.data.template == "alpaca"
    assert cfg.quantization.load_in_4bit is False
    (run / "config.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match="config.yaml"):
        run_config(run)


def test_find_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name: m\n")
    _ckpt(run, 9)
    _ckpt(run, 10)
    assert find_run(run) == (run, run / "checkpoint-10")  # numeric, not lexicographic
    assert find_run(run / "checkpoint-9") == (run, run / "checkpoint-9")
    (run / "final").mkdir()
    (run / "final" / "adapter_config.json").write_text("{}")
    assert find_run(run) == (run, run / "final")
    assert find_run(tmp_path) == (None, None)
