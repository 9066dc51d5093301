"""Whole stages on a CUDA device: top-K as the CPU's, Ray workers sharing a GPU as a local run, the demo table."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from polypure import Experiment
from polypure.attribution.hooks import forward_to, tap_layers
from polypure.attribution.topk import channel_statistic
from polypure.cli import main
from polypure.config.settings import load_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the tests/gpu tests compare "
                                 "a CUDA run with the CPU's (benchmarks/gpu_check.sh runs them on a GPU machine)")]

# the demo, small: two top-K layers, a real and a planted relevance target
SMALL = ["data.synthetic.n=400", "topk.k=12", "relevance.n_refs=12", "relevance.batch_size=48",
         "relevance.planted.pairs=3", "report.enabled=false"]
TIED = 1e-5


def _store(path, device: str, extra=()) -> Experiment:
    return Experiment(load_config("demo", [*SMALL, f"store={path}", f"device={device}", *extra]), progress=False)


def _topk(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with h5py.File(path, "r") as f:
        return {name: (f[f"topk/{name}/values"][()], f[f"topk/{name}/indices"][()]) for name in f["topk"]}


def _tied(a, b) -> np.ndarray:
    return np.abs(a - b) <= TIED * np.maximum(1.0, np.abs(b))


def assert_same_topk(expected: dict, actual: dict, statistics: dict[str, np.ndarray]) -> None:
    """Values equal to 1e-5 (relative above 1); an index differs only where its sample ties the expected one.

    ``statistics``: per layer, every sample's statistic (samples x channels) as the expected run computes it;
    for a layer without, a different index must be one of the expected list whose value ties, or its value
    must tie the K-th (the samples beyond it are not stored).
    """
    for name, (values, indices) in expected.items():
        other_values, other_indices = actual[name]
        assert np.all(_tied(other_values, values)), name
        for channel, rank in np.argwhere(other_indices != indices):
            sample, value = other_indices[channel, rank], values[channel, rank]
            if name in statistics:
                ok = _tied(statistics[name][sample, channel], value)
            else:
                listed = np.flatnonzero(indices[channel] == sample)
                ok = _tied(values[channel, listed], value).any() if len(listed) else _tied(values[channel, -1], value)
            assert ok, (name, int(channel), int(rank), int(sample))


def test_topk_on_cuda_equals_the_cpus_but_for_ties(tmp_path):
    cpu = _store(tmp_path / "cpu.h5", "cpu")
    cpu.topk()
    cuda = _store(tmp_path / "cuda.h5", "cuda")
    cuda.topk()
    expected, actual = _topk(tmp_path / "cpu.h5"), _topk(tmp_path / "cuda.h5")
    assert set(expected) == set(actual) == {"block_3", "logits", "block_3@planted"}
    # every sample's statistic on the CPU, to tell a tie from a wrong index
    model, dataset = cpu.model, cpu.dataset
    layers = {name: model.submodule(name) for name in ("block_3", "logits")}
    statistics = {name: [] for name in layers}
    with torch.no_grad(), tap_layers(layers) as outputs:
        for start in range(0, len(dataset), 100):
            forward_to(model.module, torch.stack([dataset[i][0] for i in range(start, min(start + 100,
                                                                                          len(dataset)))]), outputs)
            for name in layers:
                statistics[name].append(channel_statistic(outputs[name], "max").numpy())
    assert_same_topk(expected, actual, {name: np.concatenate(value) for name, value in statistics.items()})
    cpu.close()
    cuda.close()


def test_ray_workers_sharing_one_gpu_write_the_local_runs_relevance(tmp_path):
    ray = pytest.importorskip("ray", reason="ray (the polypure[ray] extra) is not installed")
    path = tmp_path / "store.h5"
    _store(path, "cuda").run(["topk", "relevance"])
    os.replace(path, tmp_path / "local.h5")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        _store(path, "cuda", ["executor.kind=ray", "executor.workers=2", "executor.gpus_per_worker=0.5",
                              "executor.neurons_per_task=8"]).run(["topk", "relevance"])
    finally:
        ray.shutdown()
    with h5py.File(tmp_path / "local.h5", "r") as local, h5py.File(path, "r") as remote:
        names = []
        local.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in names:
            expected, actual = local[name][()], remote[name][()]
            if name.startswith("relevance/") and expected.dtype.kind == "f":
                # each process autotunes its own cuDNN algorithms (precision.flags), which may sum in another order
                np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(),
                                           err_msg=name)
            elif name.startswith("topk/") and name.endswith("indices"):
                values = name.replace("indices", "values")
                assert_same_topk({name: (local[values][()], expected)}, {name: (remote[values][()], actual)}, {})
            elif name.startswith(("topk/", "relevance/")):
                np.testing.assert_array_equal(actual, expected, err_msg=name)


def _table(capsys, store, device: str) -> list[str]:
    assert main(["run", "demo", "--set", f"store={store}", f"device={device}", *SMALL]) == 0
    out = capsys.readouterr().out
    # the tables and comparisons print numbers to 3 decimals; the last line names the store
    return [line for line in out.splitlines() if not line.startswith("store:")]


def test_a_demo_run_on_cuda_prints_the_cpus_table(tmp_path, capsys):
    cpu = _table(capsys, tmp_path / "cpu.h5", "cpu")
    cuda = _table(capsys, tmp_path / "cuda.h5", "cuda")
    assert any("ARI planted" in line for line in cpu)
    assert cuda == cpu, "\n".join(f"cpu:  {a}\ncuda: {b}" for a, b in zip(cpu, cuda) if a != b)
