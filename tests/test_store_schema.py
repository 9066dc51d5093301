"""Must-show 4: the store opens with plain h5py, has the documented layout (version 2), `polypure inspect` shows it."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import yaml

from polypure import Experiment
from polypure.store import schema

from .helpers import random_images
from .nets import tiny


def build(path):
    Experiment(model=tiny(seed=2), dataset=random_images(12, 20, seed=3), store=path, progress=False,
               topk={"layers": ["c2", "c3"], "k": 5},
               relevance={"target_layer": "c3", "neurons": "2:6", "attribution_layers": ["c1", "c2"],
                          "n_refs": 4}).run(["topk", "relevance"])


def test_the_schema_module_builds_the_documented_paths():
    """The one owner of the layout gives the paths of the README's table (renaming one changes the format)."""
    assert schema.FORMAT_VERSION == 2
    assert (schema.SAMPLE_IDS, schema.SAMPLE_LABELS, schema.FACTORS) == ("samples/ids", "samples/labels",
                                                                          "samples/factors")
    assert schema.join(schema.topk_path("c3"), schema.INDICES) == "topk/c3/indices"
    assert schema.join(schema.relevance_path("c3"), schema.NEURONS) == "relevance/c3/neurons"
    assert schema.variant_path("c3", "default") == "relevance/c3"
    assert schema.space_path("c3", "c2") == "relevance/c3/c2"
    assert schema.space_path("c3", "lrp:c2") == "relevance/c3/lrp/c2"
    assert schema.space_path("c3", "activation", "lrp") == "relevance/c3/lrp/activation"
    assert schema.join(schema.planted_path("c3"), schema.TRUTH) == "planted/c3/truth"
    assert schema.clusters_path("c3", "lrp:c2", "kmeans") == "clusters/c3/lrp:c2/kmeans"
    assert schema.embeddings_path("clip", "c3") == "embeddings/clip/c3"
    assert schema.metrics_path("c3", "ari", "class", "c2", "kmeans") == "metrics/c3/ari/class/c2/kmeans"
    assert (schema.SUMMARY, schema.comparisons_path("c3"), schema.crops_path("c3")) == (
        "metrics/summary", "comparisons/c3", "crops/c3")
    assert schema.derived_paths("c3") == ("clusters/c3", "crops/c3", "metrics/c3", "comparisons/c3")
    assert schema.planted_target("c3") == "c3@planted" and schema.planted_layer("c3@planted") == "c3"
    assert schema.planted_layer("c3") is None


def test_schema_v2(tmp_path):
    path = tmp_path / "schema.h5"
    build(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "polypure"
        assert f.attrs["format_version"] == 2
        assert yaml.safe_load(f.attrs["config"])["topk"]["k"] == 5
        assert f.attrs["created"] and f.attrs["polypure_version"]

        ids = f["samples/ids"]
        assert ids.shape == (12,) and h5py.check_string_dtype(ids.dtype).encoding == "utf-8"
        assert ids.asstr()[0] == "index:0"
        assert f["samples/labels"].dtype == np.int64 and f["samples/labels"][3] == 0

        for layer, channels in (("c2", 12), ("c3", 16)):
            assert f[f"topk/{layer}/indices"].shape == (channels, 5)
            assert f[f"topk/{layer}/indices"].dtype == np.int64
            assert f[f"topk/{layer}/values"].dtype == np.float32
            assert f[f"topk/{layer}"].attrs["statistic"] == "max"
            values = f[f"topk/{layer}/values"][()]
            assert (np.diff(values, axis=1) <= 0).all()        # by decreasing value

        group = f["relevance/c3"]
        assert group["neurons"][()].tolist() == [2, 3, 4, 5] and group["neurons"].dtype == np.int64
        assert group["c1"].shape == (4, 4, 8) and group["c1"].dtype == np.float32
        assert group["c2"].shape == (4, 4, 12)
        assert group["activation"].shape == (4, 4, 16)
        assert group["complete"].dtype == bool and group["complete"][()].all()
        assert group.attrs["composite"] == "gradient"
        assert list(group.attrs["canonizers"]) == []
        assert group.attrs["init_rel"] == "clamp(min=0)"
        # rows are L1-normalised vectors
        np.testing.assert_allclose(np.abs(group["c2"][()]).sum(-1), 1, rtol=1e-5)
        # references are the neuron's top-K in order
        refs = f["topk/c3/indices"][2:6, :4]
        assert refs.shape == (4, 4)


def test_inspect_shows_the_store(tmp_path):
    path = tmp_path / "schema.h5"
    build(path)
    out = subprocess.run([sys.executable, "-m", "polypure", "inspect", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "samples: 12" in text
    assert "c3" in text and "16x5" in text and "complete" in text
    assert "c3: 4 neurons, n_refs 4" in text and "variant default: 4/4 neurons complete, composite gradient" in text
    assert "4x4x12" in text
    assert "config:" in text and "k: 5" in text


def test_inspect_missing_store_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "polypure", "inspect", str(tmp_path / "none.h5")],
                         capture_output=True, text=True)
    assert out.returncode == 2  # bad input, as every store error
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
