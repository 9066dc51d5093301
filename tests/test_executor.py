"""A Ray run writes the store a local run writes, also when workers die; Ray missing is one line."""

from __future__ import annotations

import os
import sys
import time

import h5py
import numpy as np
import pytest

from polypure import Experiment
from polypure.cli import main
from polypure.config.settings import load_config
from polypure.errors import ConfigError
from polypure.pipeline.executor import aligned
from polypure.pipeline.work_units import KILL_ONCE_ENV

from .crash_harness import differences

# two targets' worth of work in every unit kind: top-K shards of two layers and a planted pass, two rule
# variants over real and planted neurons, image embeddings; units small enough that each kind has several
OVERRIDES = [
    "data.synthetic.n=96", "data.batch_size=16", "topk.layers=[block_3, logits]", "topk.k=6",
    "relevance.n_refs=6", "relevance.batch_size=12",
    "relevance.targets=[{layer: block_3, neurons: '0:5', attribution_layers: [block_1, block_2]}]",
    "relevance.planted={pairs: 2, layer: block_3, mode: [sum, max], seed: 0}",
    "relevance.variants=[{id: default, composite: gradient}, {id: lrp, composite: epsilon_plus}]",
    "evaluate.references=[dino]", "evaluate.batch_size=8",
    "evaluate.dino={evaluator: dinov2, model: vit_small_patch14_dinov2.lvd142m, pretrained: false, image_size: 56,"
    " resize: 64}",
    "executor.shard_size=20", "executor.neurons_per_task=2", "executor.workers=2",
]
STAGES = ["topk", "relevance", "embed"]


def assert_same_store(expected, actual) -> None:
    """Every dataset and attribute equal, time stamps aside (the crash harness's comparison); embeddings to the last bits.

    A Ray actor computes with the threads of its ``cpus_per_worker`` (1 here), this process with 2, and the DINOv2
    forward's reductions round differently with another thread count (the local run with 1 thread gives the
    workers' embeddings bit for bit). Top-K and relevance do not depend on it: they stay bit for bit.
    """
    differ = differences(expected, actual)
    embeddings = [name for name in differ if name.startswith("embeddings/")]
    assert [name for name in differ if name not in embeddings] == []
    with h5py.File(expected, "r") as a, h5py.File(actual, "r") as b:
        for name in embeddings:
            assert name in a and name in b and isinstance(a[name], h5py.Dataset), name
            attrs = [{k: np.asarray(v).tolist() for k, v in f[name].attrs.items() if k != "created"} for f in (a, b)]
            assert attrs[0] == attrs[1], name
            np.testing.assert_allclose(b[name][()], a[name][()], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    # while this folder exists, one unit of each kind kills its worker (work.kill_once_for_test)
    kill = tmp_path_factory.mktemp("kill") / "armed"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {KILL_ONCE_ENV: str(kill)}})
    yield kill
    ray.shutdown()


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    path = folder / "store.h5"
    Experiment(load_config("demo", [*OVERRIDES, f"store={path}"]), progress=False).run(STAGES)
    return path


def run_on_ray(local_store, tmp_path, extra=(), inspect=None):
    """The Ray run's store; with ``inspect``, the stages are called one by one and ``inspect(executor)`` after them."""
    # the same store path as the local run (the config is part of the store); the local file moves aside
    path = local_store.parent / "store.h5"
    kept = tmp_path / "local.h5"
    os.replace(local_store, kept)
    try:
        exp = Experiment(load_config("demo", [*OVERRIDES, f"store={path}", "executor.kind=ray", *extra]),
                         progress=False)
        if inspect is None:
            exp.run(STAGES)
        else:
            with exp:
                for stage in STAGES:
                    getattr(exp, stage)()
                inspect(exp.executor)
        os.replace(path, tmp_path / "ray.h5")
    finally:
        os.replace(kept, local_store)
    return tmp_path / "ray.h5"


@pytest.mark.slow
def test_ray_run_writes_the_local_store(ray_cluster, local_store, tmp_path):
    assert_same_store(local_store, run_on_ray(local_store, tmp_path))
    with h5py.File(local_store, "r") as f:
        # the config really made several units of each kind: 96 samples in shards of 20 (aligned to 32)
        assert f["relevance/block_3/block_1"].shape == (5, 6, 32)
        assert f["relevance/block_3@planted/lrp/block_2"].shape[0] == 4
        assert f["embeddings/dino/block_3"].shape == (5, 6, 384)


@pytest.mark.slow
def test_workers_killed_mid_task_are_retried_and_the_store_is_the_same(ray_cluster, local_store, tmp_path):
    ray_cluster.mkdir()
    try:
        store = run_on_ray(local_store, tmp_path)
    finally:
        killed = sorted(p.name for p in ray_cluster.iterdir())
        for p in ray_cluster.iterdir():
            p.unlink()
        ray_cluster.rmdir()
    # a top-K task, a relevance actor and an embedding actor each lost their process once
    assert killed == ["embed", "relevance", "topk"]
    assert_same_store(local_store, store)


@pytest.mark.slow
def test_one_pool_of_actors_serves_every_stage_and_builds_the_model_once(ray_cluster, local_store, tmp_path):
    seen = {}

    def inspect(executor):
        seen["started"] = executor.actors_started
        seen["stats"] = executor.worker_stats()

    assert_same_store(local_store, run_on_ray(local_store, tmp_path, inspect=inspect))
    stats = seen["stats"]
    # the units, counted from the config: top-K passes over 96 samples (real layers, then planted) in shards of
    # 20 rounded up to whole batches of 16; 5 real and 2 x 2 planted neurons in ranges of 2 (a chunk of 12 rows
    # holds 2 neurons of 6 references), for each of the 2 variants
    shards = 2 * -(-96 // aligned(20, 16))
    ranges = 2 * (-(-5 // 2) + -(-4 // 2))
    assert seen["started"] == 2 and len({s["pid"] for s in stats}) == 2
    assert sum(s["calls"].get("topk", 0) for s in stats) == shards == 6
    assert sum(s["calls"].get("relevance", 0) for s in stats) == ranges == 10
    for worker in stats:
        # the same process served all three stages and built the model and the data once for them
        assert worker["builds"] == 1
        assert set(worker["calls"]) == {"topk", "relevance", "embed"} and min(worker["calls"].values()) >= 1


@pytest.mark.slow
def test_an_interrupted_run_stops_its_actors(ray_cluster, tmp_path, monkeypatch):
    import ray

    from polypure.pipeline import relevance_stage

    pool = []

    def interrupted(ctx):
        pool.extend(ctx.executor._actors)
        raise KeyboardInterrupt

    monkeypatch.setattr(relevance_stage, "run", interrupted)
    exp = Experiment(load_config("demo", [*OVERRIDES, f"store={tmp_path / 's.h5'}", "executor.kind=ray"]),
                     progress=False)
    with pytest.raises(KeyboardInterrupt):
        exp.run(STAGES)
    # the top-K stage started the actors; the relevance stage found them running; the interrupted run stopped them
    assert len(pool) == 2 and exp._executor is None
    for actor in pool:
        # ray.kill is asynchronous: a call that reaches the actor before its end may still be answered; it must
        # end within a minute, and not come back (no restart)
        deadline = time.monotonic() + 60
        with pytest.raises(ray.exceptions.RayActorError):
            while time.monotonic() < deadline:
                ray.get(actor.stats.remote(), timeout=60)
                time.sleep(0.5)
    assert ray.is_initialized()  # a Ray the run did not start is left as it was


def test_units_are_cut_at_batch_boundaries():
    assert [aligned(size, 16) for size in (1, 16, 17, 20, 32, 33)] == [16, 16, 32, 32, 32, 48]
    assert aligned(5, 1) == 5


def test_ray_asked_for_without_ray_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"executor.kind: ray needs Ray.*pip install 'polypure\[ray\]'"):
        Experiment(load_config("demo", [f"store={tmp_path / 's.h5'}", "executor.kind=ray"]))
    assert main(["topk", "demo", "--executor", "ray", "--set", f"store={tmp_path / 's.h5'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'polypure[ray]'" in err[0]
    assert not (tmp_path / "s.h5").exists()


def test_executor_keys_are_checked_and_are_no_part_of_the_stored_config():
    with pytest.raises(ConfigError, match="executor.address"):
        load_config("demo", ["executor.address=not an address"])
    with pytest.raises(ConfigError, match="executor.gpus_per_worker"):
        load_config("demo", ["executor.gpus_per_worker=2"])
    config = load_config("demo", ["executor.kind=ray", "executor.address=ray://head:10001"])
    assert "executor" not in config.stored_yaml() and "executor" in config.to_yaml()


@pytest.mark.slow
def test_in_memory_model_and_item_labels_travel_to_the_workers(ray_cluster, tmp_path):
    import torch

    from .nets import tiny

    generator = torch.Generator().manual_seed(3)
    items = torch.utils.data.TensorDataset(torch.rand(40, 3, 16, 16, generator=generator), torch.arange(40) % 3)
    path = tmp_path / "store.h5"
    stores = []
    for kind in ("local", "ray"):
        # labels come from the items, so the top-K pass collects them: on Ray, each shard's from its worker
        Experiment(model=tiny(seed=2), dataset=items, store=path, progress=False, data={"batch_size": 4},
                   topk={"layers": ["c3"], "k": 4},
                   relevance={"targets": [{"layer": "c3", "neurons": "0:6", "attribution_layers": ["c1", "c2"]}],
                              "n_refs": 4, "batch_size": 8},
                   executor={"kind": kind, "shard_size": 8, "neurons_per_task": 2}).run(["topk", "relevance"])
        stores.append(path.rename(tmp_path / f"{kind}.h5"))
    assert_same_store(*stores)
    with h5py.File(stores[1], "r") as f:
        assert f["samples/labels"][()].tolist() == (np.arange(40) % 3).tolist()
