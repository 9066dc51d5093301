"""Config validation: one line naming the key and the problem, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from polypure.cli import main
from polypure.config.settings import load_config
from polypure.errors import ConfigError

BASE = """
name: t
model: {name: torchvision:resnet18}
data: {kind: images, root: DATA, image_size: 32, limit: 8}
topk: {k: 4}
relevance: {n_refs: 4}
"""


@pytest.fixture
def cfg_file(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(BASE.replace("DATA", str(data)))
    return path


@pytest.mark.parametrize("override,message", [
    (["topk.kk=3"], "topk.kk: unknown key"),
    (["topk.k=three"], "topk.k: Input should be a valid integer"),
    (["data.root=/no/such/folder"], "data.root: folder '/no/such/folder' does not exist"),
    (["model.weights=/no/such/weights.safetensors"], "weights file '/no/such/weights.safetensors' does not exist"),
    (["relevance.n_refs=9"], "relevance.n_refs (9) must be at most topk.k (4)"),
    (["topk.statistic=median"], "topk.statistic"),
    (["relevance.neurons=1-3"], "neurons must be 'all', a list of channel ids or 'start:stop'"),
    (["device=gpu"], "device must be auto, cpu, cuda or cuda:N"),
    (["topk"], "expected KEY=VALUE"),
])
def test_bad_config_one_line_exit_2(cfg_file, capsys, override, message):
    code = main(["topk", str(cfg_file), "--set", *override])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_config_file(capsys):
    assert main(["run", "/no/such/config.yaml"]) == 2
    assert "config file '/no/such/config.yaml' does not exist" in capsys.readouterr().err


def test_bad_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntopk: [unclosed\n")
    assert main(["run", str(path)]) == 2
    assert "line" in capsys.readouterr().err


def test_set_overrides_any_key(cfg_file):
    cfg = load_config(cfg_file, ["topk.k=7", "relevance.neurons=[1, 2]", "relevance.n_refs=7",
                                 "relevance.planted.pairs=3"])
    assert cfg.topk.k == 7 and cfg.relevance.neurons == [1, 2]
    assert cfg.relevance.planted.pairs == 3


def test_targets_and_short_form_conflict(cfg_file):
    with pytest.raises(ConfigError, match="either relevance.targets or relevance.neurons"):
        load_config(cfg_file, ["relevance.neurons=[1]",
                               "relevance.targets=[{layer: block_3, attribution_layers: [block_2]}]"])


def test_the_command_line_exits_2_without_traceback(cfg_file):
    out = subprocess.run([sys.executable, "-m", "polypure", "run", str(cfg_file), "--set", "topk.kk=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("polypure: config error:") and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", [[], ["run"], ["topk"], ["relevance"], ["inspect"], ["list"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: polypure" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(p.stem for p in Path(__file__).resolve().parents[1].glob("configs/*.yaml")))
def test_every_bundled_config_is_valid(name, monkeypatch):
    """The configs the README points to load, their leaderboard sections included (data that is absent: skipped)."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    text = (root / "configs" / f"{name}.yaml").read_text()
    if "../shared/data" in text and not (root.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is absent")
    try:
        config = load_config(root / "configs" / f"{name}.yaml")
    except ConfigError as exc:
        if "data.root: folder" in str(exc) and "does not exist" in str(exc):
            pytest.skip(f"its data is to be downloaded first: {exc}")
        raise
    if config.compare.baseline is not None:
        from polypure.config.settings import space_name
        spaces = {space_name(v.id, layer) for v in config.relevance.variant_list
                  for t in [*config.relevance.target_list, *config.relevance.planted_list]
                  for layer in t.attribution_layers or []}
        assert config.compare.baseline in spaces


def test_a_conflicting_key_with_a_layer_typo_names_the_typo_too():
    # the demo uses relevance.targets; a short-form target layer conflicts, and its misspelling is said as well
    with pytest.raises(ConfigError) as error:
        load_config("demo", ["relevance.target_layer=blok_3"])
    message = str(error.value)
    assert "relevance.target_layer=blok_3" in message and "not both" in message
    assert "'blok_3' is no layer of relevance.targets (did you mean 'block_3'?)" in message
    with pytest.raises(ConfigError) as error:
        load_config("demo", ["relevance.target_layer=logits"])
    assert "did you mean" not in str(error.value)            # a real layer is only a conflict
