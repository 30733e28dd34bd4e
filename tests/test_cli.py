"""The command line: one registry of commands, and a light `tunelab --help` (no torch, no transformers)."""

import subprocess
import sys

import pytest

from tunelab import cli

HEAVY = ("torch", "transformers", "datasets", "peft")


def _imports_after(code: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def test_import_cli_is_light():
    mods = _imports_after("import tunelab.cli")
    assert not [m for m in HEAVY if m in mods]


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["trian", "x.yaml"], ["train"], ["config", "--help"],
                                  ["config"], ["train", "--help"], ["check", "--help"]])
def test_help_version_and_typos_stay_light(argv):
    code = f"from tunelab.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    mods = _imports_after(code)
    assert not [m for m in HEAVY if m in mods], argv


def test_mistyped_command_suggests_the_near_one():
    r = subprocess.run([sys.executable, "-m", "tunelab", "trian", "x.yaml"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "tunelab: error: invalid choice: 'trian' (did you mean 'train'?) (see tunelab --help)"]


def test_version():
    r = subprocess.run([sys.executable, "-m", "tunelab", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("tunelab ")


def test_one_registry_every_command_builds_and_runs_resolve():
    parser = cli.build_parser()  # every command in full
    sub = next(a for a in parser._actions if a.dest == "command")  # argparse keeps subparsers only here
    assert list(sub.choices) == [c.name for c in cli.COMMANDS]
    for c in cli.COMMANDS:
        assert callable(cli._load(c.run)), c
        assert sub.choices[c.name].description == c.help
        # the light parser for one command gives the same arguments as the full one
        light = next(a for a in cli.build_parser([c.name])._actions if a.dest == "command").choices[c.name]
        assert [a.dest for a in light._actions] == [a.dest for a in sub.choices[c.name]._actions]


def test_a_parser_function_cannot_add_an_undeclared_command(monkeypatch):
    def rogue(sub):
        sub.add_parser("train")
        sub.add_parser("trainz")

    monkeypatch.setattr(cli, "_train_parser", rogue)
    with pytest.raises(RuntimeError, match="'trainz' is added by a parser function but is not in COMMANDS"):
        cli.build_parser(["train"])


def test_serve_takes_the_port_before_loading_the_model(monkeypatch, capsys):
    import socket

    import tunelab.models
    from tunelab.models import ModelError

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    loads = []
    monkeypatch.setattr(tunelab.models, "load_for_inference", lambda spec: loads.append(spec))
    try:
        code = cli.main(["serve", "smollm2-135m", "--port", str(port), "--backend", "transformers"])
    finally:
        busy.close()
    assert code == 2 and loads == []
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err

    def load_while_listening(spec, **kwargs):  # the port is already ours while the model loads
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        raise ModelError("stop here")

    monkeypatch.setattr(tunelab.models, "load_for_inference", load_while_listening)
    assert cli.main(["serve", "smollm2-135m", "--port", str(port), "--backend", "transformers"]) == 2
    assert "stop here" in capsys.readouterr().err
    with socket.socket() as again:  # and given back when loading failed
        again.bind(("127.0.0.1", port))


def test_offline_hub_dataset_fails_at_once(monkeypatch):
    import datasets

    import tunelab.models
    from tunelab.data.sources import DataError, read_rows

    seen = []

    def fake_load(*a, **k):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        raise ConnectionError("offline")

    monkeypatch.setattr(tunelab.models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(DataError, match="hub is unreachable"):
        read_rows("someone/some-dataset")
    assert seen == [True]  # only the local cache was tried, never the network
    assert datasets.config.HF_HUB_OFFLINE == before


def test_gguf_loader_bar_is_off(capsys):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from tunelab.quiet import gguf_progress_off

    list(gguf_utils.tqdm(range(3), desc="shown-bar"))
    with gguf_progress_off():
        list(gguf_utils.tqdm(range(3), desc="hidden-bar"))
    err = capsys.readouterr().err
    assert "shown-bar" in err and "hidden-bar" not in err  # the first shows the check can see a bar


def test_two_process_training_prints_no_third_party_noise(tmp_path, tiny_config):
    """Each rank used to print DDP's find_unused_parameters notice and bitsandbytes' missing-`kernels` warning,
    and the config's warnings came twice (launcher and rank 0)."""
    r = subprocess.run([sys.executable, "-m", "tunelab", "train", str(tiny_config), "--output", str(tmp_path / "o"),
                        "--launcher", "accelerate", "--num-processes", "2", "--set", "train.max_steps=2",
                        "--set", "train.save_steps=2", "--set", "data.test_size=0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr
    for noise in ("find_unused_parameters", "kernels", "Writing model shards", "it/s]"):
        assert noise not in err, err[-3000:]
    assert err.count("train.learning_rate=0.001 is outside") == 1, err[-3000:]
