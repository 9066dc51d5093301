"""configs/demo_vit.yaml end to end, made small: both rules on ViT neurons, the table, the report in Chromium."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from polypure.cli import main

from .helpers import REPO, chromium, screenshot

pytest.importorskip("lxt.efficient", reason="lxt (the polypure[lxt] extra) is not installed")


@pytest.mark.slow
def test_demo_vit_config_runs_end_to_end_and_its_vit_neurons_render_in_chromium(tmp_path):
    store, out = tmp_path / "vit.h5", tmp_path / "report"
    overrides = ["data.synthetic={n: 240, size: 64, seed: 0}", "topk.k=12", "relevance.n_refs=12",
                 "relevance.targets=[{layer: logits, neurons: all, attribution_layers: [block_1, mlp_3]}, "
                 "{layer: mlp_3, neurons: '0:6', attribution_layers: [block_0, block_2]}]",
                 "relevance.planted={pairs: 3, layer: mlp_3, mode: [sum, max], seed: 0}",
                 "report.neurons=2", f"store={store}", f"report.out={out}"]
    assert main(["run", str(REPO / "configs" / "demo_vit.yaml"), "-q", "--set", *overrides]) == 0

    with h5py.File(store, "r") as f:
        assert f["topk/mlp_3/values"].shape == (512, 12)                # the MLP's hidden neurons
        for variant in ("", "attnlrp/"):
            relevance = f[f"relevance/mlp_3/{variant}block_0"][:]
            assert relevance.shape == (6, 12, 128) and np.isfinite(relevance).all()
            assert f[f"relevance/mlp_3@planted/{variant}complete"][:].all()
        # the two rules give different relevance for the same rows
        assert np.abs(f["relevance/mlp_3/block_0"][:] - f["relevance/mlp_3/attnlrp/block_0"][:]).max() > 1e-3
    table = json.loads((tmp_path / "vit.metrics.json").read_text())
    text = json.dumps(table)
    assert "attnlrp:block_0" in text and "ARI planted" in text and "ARI shape" in text

    page = sorted((out / "neurons" / "mlp_3").glob("*.html"))[0]
    image = screenshot(tmp_path, page, "vit_neuron.png")
    assert np.asarray(image).std() > 20 and len(image.getcolors(1 << 22)) > 500
    dom = chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    assert "mlp_3 neuron" in dom and "attnlrp:block_0" in dom and "<img" in dom
