"""Every config key and every command-line option carries the description the documentation site shows.

The site's config-key and command-line pages are generated from the code by ``docs/scripts/reference.py``;
these tests use the same walks, so a key or an option added without a description fails here, not only as a
blank on the site. No site is built.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "scripts" / "reference.py"


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("polypure_docs_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is made
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_every_config_key_has_a_description(reference):
    _, keys = reference.config_reference()
    missing = [key.key for key in keys if not key.description.strip()]
    assert not missing, f"config keys without a description (Field(description=...) or a docstring): {missing}"


def test_the_config_walk_reaches_nested_mappings_and_the_keys_read_elsewhere(reference):
    groups, keys = reference.config_reference()
    found = {key.key for key in keys}
    for expected in ("seed", "relevance.composite", "relevance.targets[].attribution_layers",
                     "relevance.variants[].composite.name", "relevance.planted.mode", "model.layers.<name>.module",
                     "cluster.methods[].id", "data.normalize.std", "data.synthetic.noise",
                     "evaluate.<name>.view", "evaluate.clip.pooling", "evaluate.dinov2.resize", "executor.workers"):
        assert expected in found
    # an evaluator's own settings are listed without the common ones it inherits
    assert "evaluate.clip.view" not in found
    assert [g.path for g in groups][:2] == ["", "model"]


def test_config_keys_show_type_constraints_and_defaults(reference):
    _, keys = reference.config_reference()
    by_key = {key.key: key for key in keys}
    assert by_key["topk.k"].type == "int ≥ 1" and by_key["topk.k"].default == "50"
    assert by_key["topk.statistic"].type == "max | mean | cls"
    assert by_key["store"].type == "path | null" and by_key["store"].default == "null"
    assert by_key["cluster.methods"].default == "[{name: kmeans, n_clusters: 2}]"
    assert by_key["relevance.targets[].layer"].default == "required"


def test_a_key_without_a_description_is_reported(reference):
    class Inner(BaseModel):
        """A nested mapping."""

        documented: int = 1
        """Says what it is."""
        bare: int = 2

    class Outer(BaseModel):
        """A config."""

        described: str = Field("x", description="Given to Field.")
        items: list[Inner] = Field(default_factory=list)
        """A list of mappings."""

    _, keys = reference.walk_model(Outer)
    descriptions = {key.key: key.description for key in keys}
    assert descriptions == {"described": "Given to Field.", "items": "A list of mappings.",
                            "items[].documented": "Says what it is.", "items[].bare": ""}


def test_every_command_and_option_has_help(reference):
    commands = reference.cli_reference()
    missing = [command.name for command in commands[1:] if not (command.help.strip() and command.description.strip())]
    assert not missing, f"commands without help= or description=: {missing}"
    missing = [f"{command.name or 'polypure'} {'/'.join(arg.names)}" for command in commands
               for arg in command.arguments if not arg.help.strip()]
    assert not missing, f"command-line arguments without help=: {missing}"


def test_the_command_walk_covers_every_command_and_its_options(reference):
    commands = {command.name: command for command in reference.cli_reference()}
    expected = {"run", "topk", "report", "export", "compare", "check-rules", "inspect", "list", "demo-train"}
    assert expected <= set(commands)
    run = {name for arg in commands["run"].arguments for name in arg.names}
    assert {"config", "--set", "--overwrite", "--stages", "--executor", "--workers"} <= run
    assert commands["run"].usage.startswith("usage: polypure run")
    assert commands["export"].arguments[-2].metavar == "{csv,parquet}"


def test_an_option_without_help_is_reported(reference):
    parser = argparse.ArgumentParser(prog="tool", description="A tool.")
    sub = parser.add_subparsers(dest="command")
    go = sub.add_parser("go", help="go somewhere", description="Go somewhere.")
    go.add_argument("--far", action="store_true", help="go far")
    go.add_argument("--fast", action="store_true")
    sub.add_parser("stay")

    commands = {command.name: command for command in reference.cli_reference(parser)}
    assert {arg.names: arg.help for arg in commands["go"].arguments} == {("--far",): "go far", ("--fast",): ""}
    assert commands["stay"].help == "" and commands["go"].help == "go somewhere"


def test_every_module_on_disk_gets_an_api_page(reference):
    names = {module.name for module in reference.modules()}
    on_disk = {".".join(path.relative_to(reference.PACKAGE_DIR.parent).with_suffix("").parts).removesuffix(
        ".__init__") for path in reference.PACKAGE_DIR.rglob("*.py")}
    assert names == {name for name in on_disk if not any(part.startswith("_") for part in name.split("."))}
    assert "polypure" in names and "polypure.cli" in names and "polypure.__main__" not in names
