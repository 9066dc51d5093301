"""The README tells the truth: its commands are the ones CI runs, and its Python example works."""

from __future__ import annotations

import re

import h5py
import torch

from .helpers import REPO

README = (REPO / "README.md").read_text()


def fenced(after: str, language: str) -> list[str]:
    section = README.split(after, 1)[1]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_ci_runs_the_readme_test_command():
    command = fenced("**Run the test suite:**", "bash")[0].strip()
    assert command in (REPO / ".ci" / "run").read_text().splitlines()


def test_main_job_command_runs_the_demo():
    command = fenced("**Run the main job**", "bash")[0].strip()
    assert command.endswith("polypure run") and "pip install -e ." in command


def test_python_example_works(tmp_path, monkeypatch):
    code = fenced("From Python, with an in-memory model", "python")[0]
    code = code.replace('weights="DEFAULT"', "weights=None").replace('"r18.h5"', repr(str(tmp_path / "r18.h5")))
    images = torch.rand(12, 3, 48, 48)
    my_dataset = torch.utils.data.TensorDataset(images, torch.arange(12) % 3)
    monkeypatch.chdir(tmp_path)
    namespace = {"my_dataset": my_dataset}
    exec(code.replace('topk={"k": 50}', 'topk={"k": 5}').replace('"neurons": "0:16"', '"neurons": "0:2", "n_refs": 5'),
         namespace)
    with h5py.File(tmp_path / "r18.h5", "r") as f:
        assert f["relevance/block_3/block_2"].shape == (2, 5, 256)
        assert "metrics/summary" in f


def test_vision_transformer_config_example_is_a_valid_config():
    import yaml

    from polypure.config.settings import config_from_dict
    from polypure.pipeline.preflight import check_rules

    config = config_from_dict(yaml.safe_load(fenced("## Vision transformers", "yaml")[0]))
    assert config.model.name.startswith("timm:") and config.topk.statistic == "max"
    assert [v.composite for v in config.relevance.variant_list] == ["gradient", "attnlrp"]
    check_rules(config)                      # the composites and their parameters exist
