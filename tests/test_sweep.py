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


# ---- issue 18.8 ---------------------------------------------------------------------------------

def test_random_search_draws_lists_and_ranges_by_seed():
    from tunelab.sweep import parse_params, random_trials

    grid = parse_params(["train.learning_rate=log:1e-5..1e-3", "lora.r=int:4..32", "lora.dropout=0..0.2",
                         "lora.target_modules=[q_proj],[q_proj,v_proj]"])
    a, b = random_trials(grid, 20, seed=7), random_trials(grid, 20, seed=7)
    assert a == b and a != random_trials(grid, 20, seed=8)
    assert all(1e-5 <= float(t["train.learning_rate"]) <= 1e-3 and 4 <= int(t["lora.r"]) <= 32
               and 0 <= float(t["lora.dropout"]) <= 0.2 for t in a)
    assert {t["lora.target_modules"] for t in a} == {"[q_proj]", "[q_proj,v_proj]"}
    assert len({t["lora.r"] for t in a}) > 5  # really drawn, not one value
    lrs = sorted(float(t["train.learning_rate"]) for t in a)
    assert lrs[0] < 1e-4 < lrs[-1]  # log-uniform: both decades are reached


def test_sweep_flags_are_checked_before_any_trial(tmp_path, tiny_config, alpaca_file, capsys):
    out = tmp_path / "sw"
    for extra, msg in ((["--param", "train.learning_rate=1e-4..1e-3"], "a range needs --random N"),
                       (["--param", "lora.r=8", "--metric", f"eval:ppl:{alpaca_file}:exact_match"],
                        "a perplexity task reports loss, perplexity, not 'exact_match'"),
                       (["--param", "lora.r=8", "--metric", "accuracy"], "expected one of"),
                       (["--param", "lora.r=1..x", "--random", "2"], "a range is LO..HI")):
        assert main(["sweep", str(tiny_config), "--output", str(out), *extra]) == 2
        assert msg in capsys.readouterr().err
    assert not out.exists()


def test_random_sweep_picks_the_best_by_an_eval_metric_with_progress_lines(tmp_path, tiny_config, alpaca_file,
                                                                         capsys):
    out = tmp_path / "sw"
    metric = f"eval:ppl:{alpaca_file}:perplexity"
    assert main(["sweep", str(tiny_config), "--random", "2", "--seed", "1", "--param",
                 "train.learning_rate=log:1e-4..1e-1", "--set", "train.max_steps=2", "--set", "train.eval_steps=2",
                 "--metric", metric, "--eval-limit", "8", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "sweep: 1/2 trials (0 failed), elapsed " in err and "sweep: 2/2 trials (0 failed)" in err
    s = json.loads((out / "sweep_summary.json").read_text())
    ppl = {}
    for t in s["trials"]:  # what tunelab eval wrote in each trial folder
        (res,) = (out / t["name"]).glob("eval-*/results.json")
        (per,) = json.loads(res.read_text())["models"].values()
        (scores,) = per.values()  # the one task, ppl:<file name>
        ppl[t["name"]] = scores["metrics"]["perplexity"][0]
        assert t["summary"][metric] == ppl[t["name"]]
    assert len(set(ppl.values())) == 2 and s["best"] == min(ppl, key=ppl.get)


def test_an_accuracy_metric_picks_the_highest(tmp_path):
    from tunelab.sweep import finish

    rows = [{"name": n, "params": {"lora.r": n}, "status": "done", "summary": {"eval:t.yaml:exact_match": v}}
            for n, v in (("a", 0.2), ("b", 0.7), ("c", 0.5))]
    finish(tmp_path, rows, ["lora.r"], "eval:t.yaml:exact_match")
    assert json.loads((tmp_path / "sweep_summary.json").read_text())["best"] == "b"
    rows = [{**r, "summary": {"eval:ppl:x.jsonl:perplexity": r["summary"]["eval:t.yaml:exact_match"]}} for r in rows]
    finish(tmp_path, rows, ["lora.r"], "eval:ppl:x.jsonl:perplexity")
    assert json.loads((tmp_path / "sweep_summary.json").read_text())["best"] == "a"
