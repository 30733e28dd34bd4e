import json

from tunelab.cli import main


def test_sweep_grid_resume_failed_trial_and_best(tmp_path, tiny_config, capsys):
    out = tmp_path / "sw"
    args = ["sweep", str(tiny_config), "--param", "lora.target_modules=[q_proj,v_proj],[q_proj],[nope_proj]",
            "--output", str(out), "--workers", "2"]
    assert main(args) == 0
    s = json.loads((out / "sweep_summary.json").read_text())
    status = {t["name"]: t["status"] for t in s["trials"]}
    assert len(status) == 3
    assert sum(v == "done" for v in status.values()) == 2 and sum(v == "failed" for v in status.values()) == 1
    failed = [t for t in s["trials"] if t["status"] == "failed"]
    assert all("nope_proj" in t["params"]["lora.target_modules"] for t in failed)
    assert all("target_modules" in t["reason"] for t in failed)
    best = s["best"]
    done = [t for t in s["trials"] if t["status"] == "done"]
    assert best == min(done, key=lambda t: t["summary"]["best_eval_loss"])["name"]
    assert (out / "sweep_eval_loss.png").stat().st_size > 5000
    capsys.readouterr()
    # rerun: finished trials are kept, not retrained
    assert main(args) == 0
    s2 = json.loads((out / "sweep_summary.json").read_text())
    assert sorted(t["status"] for t in s2["trials"]) == ["done (kept)", "done (kept)", "failed"]


def test_grid_parsing():
    from tunelab.sweep import parse_params, trial_name

    grid = parse_params(["train.learning_rate=1e-5, 1e-4", "lora.target_modules=[q_proj,v_proj],[q_proj]"])
    assert grid == [("train.learning_rate", ["1e-5", "1e-4"]), ("lora.target_modules", ["[q_proj,v_proj]", "[q_proj]"])]
    assert trial_name(3, {"train.learning_rate": "1e-5"}) == "t03-learning_rate=1e-5"


def test_invalid_values_reported_before_any_trial(tmp_path, tiny_config, capsys):
    out = tmp_path / "sw"
    code = main(["sweep", str(tiny_config), "--param", "train.learning_rate=1e-4,-1,abc", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "2 of 3 trials are invalid, nothing was run" in err
    assert not out.exists()
