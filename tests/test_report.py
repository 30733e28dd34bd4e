import json
import re
import shutil
import subprocess

import pytest

from tunelab.cli import main


def test_report_html_and_markdown_render(tmp_path, tiny_config, tiny_model, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", str(tiny_config), "--output", str(run), "--set", "train.max_steps=6"]) == 0
    cmp_dir = tmp_path / "cmp"
    prompts = tmp_path / "p.txt"
    prompts.write_text("Add 1 and 2.\nAdd 3 and 4.\n")
    assert main(["compare", str(tiny_model), str(run), "--prompts", str(prompts), "--out", str(cmp_dir),
                 "--max-new-tokens", "5"]) == 0
    (cmp_dir / "judge_pairwise.json").write_text(json.dumps(
        {"b_win_rate": [0.6, 0.4, 0.8], "lc_win_rate": [0.55, 0.35, 0.75], "b_wins": 3, "a_wins": 2, "ties": 0,
         "errors": 0}))
    rows = [{"q": f"Add {i} and {i}.", "opts": [str(2 * i), "x"], "a": 0} for i in range(6)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text("name: add\npath: mc.jsonl\ncontext: \"Q: {q}\\nA:\"\nchoices: \"{opts}\"\n"
                                      "gold: \"{a}\"\n")
    ev = tmp_path / "ev"
    assert main(["eval", str(tiny_model), str(run), "--tasks", str(tmp_path / "mc.yaml"), "--out", str(ev)]) == 0
    out = tmp_path / "rep"
    assert main(["report", str(run), str(ev), str(cmp_dir), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # loss curve, benchmark bars, win-rate bars
    md = (out / "report.md").read_text()
    for png in ("run_loss.png", "ev_bench.png", "cmp_winrate.png"):
        assert f"]({png})" in md and (out / png).stat().st_size > 5000
    assert "add (n=6, 0-shot)" in page and "Add 3 and 4." in page
    # markdown tables: header, separator and rows on consecutive lines (a blank line would end the table)
    assert re.search(r"\n\| task \| metric [^\n]*\|\n\|---\|---\|[^\n]*\n\| add \(n=6, 0-shot\) \|", md)
    assert main(["report", str(tmp_path / "mc.yaml")]) == 2

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("headless Chromium not installed (apt-get install chromium); HTML written but not rendered")
    shot = tmp_path / "shot.png"
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,1800",
                        f"--screenshot={shot}", (out / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.is_file(), r.stderr.decode()[-500:]
    import matplotlib.image

    img = matplotlib.image.imread(shot)
    # a rendered page: mostly white, but with plenty of non-white pixels from text, tables and the plots
    nonwhite = (img[..., :3].mean(axis=2) < 0.9).mean()
    assert 0.02 < nonwhite < 0.6, nonwhite
    colored = ((img[..., 0] - img[..., 2]).__abs__() > 0.2).mean()  # the plots' blue/orange lines and bars
    assert colored > 0.001, colored
