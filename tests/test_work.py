"""A top-K shard and a range of neurons run in a spawn worker from the config alone."""

from __future__ import annotations

import multiprocessing

import h5py
import numpy as np
import pytest

from polypure import Experiment
from polypure.attribution.relevance_plan import TargetPlan, rule_from_config
from polypure.config.settings import load_config
from polypure.models.factory import build_model
from polypure.pipeline.work_units import relevance_rows, topk_shard

OVERRIDES = ["data.synthetic.n=40", "topk.k=6", "topk.layers=[block_3]", "relevance.n_refs=4",
             "relevance.batch_size=16", "relevance.planted=null",
             "relevance.targets=[{layer: block_3, neurons: '0:6', attribution_layers: [block_1, block_2]}]"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    store = tmp_path_factory.mktemp("work") / "local.h5"
    config = load_config("demo", [*OVERRIDES, f"store={store}"])
    Experiment(config, progress=False).run(["topk", "relevance"])
    return config, store


@pytest.mark.slow
def test_shards_and_neuron_ranges_in_spawn_workers_equal_a_local_run(local):
    config, store = local
    context = multiprocessing.get_context("spawn")
    model = build_model(config)
    plan = TargetPlan("block_3", "block_3", np.arange(6), ["block_1", "block_2"])
    rule = rule_from_config(config, model)
    with h5py.File(store, "r") as f:
        refs = f["topk/block_3/indices"][()][plan.neurons, :4]
        expected_topk = f["topk/block_3/indices"][()], f["topk/block_3/values"][()]
        expected = {name: f[f"relevance/block_3/{name}"][()] for name in ("block_1", "block_2", "activation")}
    with context.Pool(1) as pool:
        first = pool.apply_async(topk_shard, (config, ["block_3"], 0, 17))
        rows = pool.apply_async(relevance_rows, (config, plan, refs, np.array([4, 1, 2]), rule))
        first, rows = first.get(timeout=300), rows.get(timeout=300)
    merged = first["block_3"].merge(topk_shard(config, ["block_3"], 17, 40)["block_3"])
    values, indices, _ = merged.arrays()
    np.testing.assert_array_equal(indices, expected_topk[0])
    np.testing.assert_array_equal(values, expected_topk[1])
    rest = relevance_rows(config, plan, refs, np.array([0, 3, 5]), rule)
    for name, stored in expected.items():
        np.testing.assert_array_equal(rows[name], stored[[4, 1, 2]], err_msg=name)
        np.testing.assert_array_equal(rest[name], stored[[0, 3, 5]], err_msg=name)
