"""The README tells the truth: its commands are the ones CI runs, its examples and those of the docs work."""

from __future__ import annotations

import re

import h5py
import torch

from .helpers import REPO, doc_page

README = (REPO / "README.md").read_text()
USAGE = doc_page("usage.md")


def fenced(after: str, language: str, text: str = README) -> list[str]:
    section = text.split(after, 1)[1]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_ci_runs_the_readme_test_command():
    command = fenced("**Run the test suite:**", "bash")[0].strip()
    assert command in (REPO / ".ci" / "run").read_text().splitlines()


def test_main_job_command_runs_the_demo():
    command = fenced("**Run the main job**", "bash")[0].strip()
    assert command.endswith("polypure run") and "pip install -e ." in command


def test_python_example_works(tmp_path, monkeypatch):
    code = fenced("From Python, with an in-memory model", "python", USAGE)[0]
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


def test_own_model_in_ten_lines_runs_with_aliases_and_module_paths(tmp_path, monkeypatch):
    code = fenced("## Your own model in ten lines", "python")[0]
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    exec(code.replace("torch.rand(64,", "torch.rand(24,").replace("torch.arange(64)", "torch.arange(24)"), {})
    with h5py.File(tmp_path / "mnv2.h5", "r") as f:
        assert f["relevance/late/mid"].shape == (4, 8, 64) and f["relevance/late/features.5"].shape == (4, 8, 32)
        assert "metrics/summary" in f


def test_readme_is_a_first_page_and_links_into_the_docs():
    assert len(README.splitlines()) <= 250
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (REPO / link).is_file(), f"README links to {link}, which does not exist"


def test_vision_transformer_config_example_is_a_valid_config():
    import yaml

    from polypure.config.settings import config_from_dict
    from polypure.pipeline.preflight import check_rules

    config = config_from_dict(yaml.safe_load(fenced("# Vision transformers", "yaml", doc_page("how-to/vision-transformers.md"))[0]))
    assert config.model.name.startswith("timm:") and config.topk.statistic == "max"
    assert [v.composite for v in config.relevance.variant_list] == ["gradient", "attnlrp"]
    check_rules(config)                      # the composites and their parameters exist
