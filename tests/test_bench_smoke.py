"""CI smoke of bench/bench_train.py (a few steps on the tiny model): the script must not rot.

Not a benchmark: no speed is asserted, only that every figure is produced and that tunelab and
the recipe's stack trained the same tokens with the same loss curve."""

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_bench_train_smoke(tmp_path, tiny_model, alpaca_file):
    import bench_train

    out = tmp_path / "train.json"
    rc = bench_train.main(["--model", str(tiny_model), "--data", str(alpaca_file), "--max-seq-length", "128",
                           "--steps", "3", "--batch", "2", "--accum", "2", "--arms", "tunelab,tunelab-fp32,recipe-fp32-nogc",
                           "--out", str(out), "--tmp", str(tmp_path / "scratch")])
    assert rc == 0
    r = json.loads(out.read_text())
    arms = {a["arm"]: a for a in r["arms"]}
    assert set(arms) == {"tunelab", "tunelab-fp32", "recipe-fp32-nogc"}
    for a in arms.values():
        assert a["steps"] == 3 and a["tokens_per_second"] > 0 and 0 < a["mfu"] and a["peak_rss_train_gib"] > 0
        assert 0 < a["mfu_best_peak"] <= a["mfu"] + 1e-9 and len(a["losses"]) == 3
    # the exact-arithmetic pair: tunelab in fp32 and the recipe's stack in fp32 train the same curve
    vs = r["tunelab_vs"]["tunelab-fp32 vs recipe-fp32-nogc"]
    assert vs["same_tokens_per_step"], (arms["tunelab-fp32"]["tokens_per_step"], arms["recipe-fp32-nogc"]["tokens_per_step"])
    assert vs["max_abs_loss_diff"] < 1e-3
    # the tunelab arm runs tunelab's defaults: model.dtype=auto, whose choice depends on this CPU
    from tunelab.models import pick_precision

    auto = pick_precision("auto", "cpu")
    assert arms["tunelab"]["precision"] == auto.name and arms["tunelab-fp32"]["precision"] == "float32"
    assert arms["tunelab"]["matmul_dtype"] == str(auto.compute).replace("torch.", "")
    assert r["tunelab_vs"]["tunelab vs recipe-fp32-nogc"]["same_tokens_per_step"]
    assert r["fp32_matmul_peak_gflops"]["used"] > 0 and r["bf16_matmul_peak_gflops"]["used"] > 0
    m = r["machine"]
    assert m["cpu"] and isinstance(m["cpu_flags"], list) and m["torch_threads"] >= 1 and len(r["load_average_before"]) == 3


def test_bench_train_bad_arm(capsys):
    import bench_train

    assert bench_train.main(["--arms", "nope"]) == 2
    assert "unknown arm" in capsys.readouterr().err


def test_bench_matmul_smoke(tmp_path):
    """bench/bench_matmul.py (matmul GFLOP/s at the model's shapes) runs and writes its JSON."""
    import bench_matmul

    out = tmp_path / "matmul.json"
    assert bench_matmul.main(["--rows", "16", "--threads", "1", "--dtypes", "float32", "--reps", "1",
                              "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    (run,) = r["runs"]
    assert run["rows"] == 16 and run["linear"]["layer_gflops"] > 0 and run["fused"]["qkv"]["forward_gflops"] > 0
