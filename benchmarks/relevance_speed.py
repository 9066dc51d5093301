"""Relevance stage speed against the published procedure and against the bare floor, in one process.

ResNet-34 (random weights) at 224 px, attribution layers block_0..block_2 (layer1..layer3), N neurons of
block_3 x R references each. Three timings of the same work:

* polypure: ``Experiment.relevance()`` (top-K already in the store; includes loading, hooks, writing);
* published: zennit-crp ``CondAttribution``, one call per neuron per attribution layer, backward down to
  the input (how the seed paper's code computed it);
* floor: a bare forward to layer4 plus one ``torch.autograd.grad`` per batch of rows, no hooks, no
  bookkeeping, no sharing.

Run: ``python benchmarks/relevance_speed.py [--neurons 8] [--refs 16] [--repeats 2]``. The printed ratios
are the result; this machine is noisy, so each timing is the best of ``--repeats`` runs.

``--sharing`` times instead what sharing forward passes gains (:mod:`polypure.attribution.sharing`), on the
demo config's relevance stage (its three targets) and on ``benchmarks/scale.py --size small``'s (ResNet-34,
16 neurons x 16 references of 256 images): per target the share of (neuron, reference) pairs whose forward row
another pair computed, then the whole stage (``Experiment.relevance()``) with sharing and without it (the
old path: every pair its own forward row) against the per-pair floor on the same rows, all in this process,
interleaved, best of ``--repeats``. Goal: stage / floor <= 0.8, and no slower than without sharing where
nothing is shared. On a machine other work shares, ``--threads 1`` gives steadier timings (two threads waiting
for each other at every operation suffer most from a third process).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from zennit.core import Composite

from polypure import Experiment
from polypure.data.datasets import ArrayDataset

LAYERS = ["layer1", "layer2", "layer3"]


def bare_pass(m, images, refs, neurons, batch):
    """The floor: per batch of (neuron, reference) rows a bare forward to layer4 and one autograd.grad."""
    resnet_floor(m, images, refs, neurons, batch, "block_3", 3)


def resnet_floor(net, images, refs, neurons, batch, target, depth):
    """The per-pair floor on a torchvision-style ResNet, as :func:`bare_pass`.

    Per batch of rows a bare forward from the input to ``target`` (``block_3`` or ``logits``), cut at
    block_0, and one autograd.grad to the first ``depth`` blocks.
    """
    rows = torch.as_tensor(refs.reshape(-1))
    row_neurons = torch.as_tensor(np.repeat(neurons, refs.shape[1]))
    for start in range(0, len(rows), batch):
        x = images[rows[start:start + batch]]
        k = row_neurons[start:start + batch]
        with torch.no_grad():
            h = net.relu(net.bn1(net.conv1(x)))
            h = net.maxpool(h) if hasattr(net, "maxpool") else h
        blocks = [net.layer1(h).requires_grad_(True)]
        for layer in (net.layer2, net.layer3, net.layer4):
            blocks.append(layer(blocks[-1]))
        out = blocks[-1] if target == "block_3" else net.fc(torch.flatten(net.avgpool(blocks[-1]), 1))
        grad = torch.zeros_like(out)
        index = torch.arange(len(x))
        grad[index, k] = out.detach()[index, k].clamp(min=0)
        torch.autograd.grad(out, blocks[:depth], grad)


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=8)
    parser.add_argument("--refs", type=int, default=16)
    parser.add_argument("--images", type=int, default=48, help="dataset size (neurons share references)")
    parser.add_argument("--batch", type=int, default=64, help="rows per backward pass")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cli", action="store_true", help="also time the stage through the command line")
    parser.add_argument("--sharing", action="store_true",
                        help="time shared forward passes on the demo and scale.py's small size instead")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 times a machine shared with other work steadily")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sharing:
        sharing(args.repeats)
        return
    torch.manual_seed(0)
    model = torchvision.models.resnet34().eval()
    rng = np.random.default_rng(0)
    dataset = ArrayDataset(rng.integers(0, 256, (args.images, 224, 224, 3), dtype=np.uint8),
                           mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    neurons = list(range(0, 512, 512 // args.neurons))[:args.neurons]
    tmp = Path(tempfile.mkdtemp())
    settings = dict(data={"batch_size": 16}, topk={"k": args.refs},
                    relevance={"neurons": neurons, "n_refs": args.refs, "batch_size": args.batch})
    Experiment(model=model, dataset=dataset, store=tmp / "bench.h5", progress=False, **settings).topk()
    with h5py.File(tmp / "bench.h5", "r") as f:
        refs = f["topk/block_3/indices"][()][neurons]
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    unique = len(np.unique(refs))
    print(f"ResNet-34, 224 px, {args.neurons} neurons x {args.refs} refs ({unique} distinct images), "
          f"3 attribution layers, {torch.get_num_threads()} threads")

    def ours():
        with h5py.File(tmp / "bench.h5", "a") as f:
            if "relevance" in f:
                del f["relevance"]
        Experiment(model=model, dataset=dataset, store=tmp / "bench.h5", progress=False, **settings).relevance()

    crp_model = copy.deepcopy(model)
    attribution = CondAttribution(crp_model)

    def published():
        for n, neuron in enumerate(neurons):
            x = images[refs[n]]
            for layer in LAYERS:
                attr = attribution(x.clone().requires_grad_(True), [{"layer4": [neuron]}], Composite(),
                                   record_layer=[layer], start_layer="layer4", init_rel=lambda a: a.clamp(min=0))
                ChannelConcept().attribute(attr.relevances[layer] * attr.activations[layer], abs_norm=True)

    floor_model = copy.deepcopy(model).requires_grad_(False)

    def floor():
        bare_pass(floor_model, images, refs, neurons, args.batch)

    t_ours = best_of(args.repeats, ours)
    t_floor = best_of(args.repeats, floor)
    t_published = best_of(max(1, args.repeats - 1), published)
    print(f"polypure relevance stage : {t_ours:7.2f} s")
    print(f"published (crp) procedure: {t_published:7.2f} s   -> polypure is {t_published / t_ours:.2f}x faster "
          "(target >= 3x)")
    print(f"floor (forward + 1 grad) : {t_floor:7.2f} s   -> polypure / floor = {t_ours / t_floor:.2f} "
          "(target <= 1.1)")
    if args.cli:
        def floor_for(data, cli_refs, cli_neurons):
            decoded = torch.stack([data[i][0] for i in range(len(data))])
            return best_of(args.repeats, lambda: bare_pass(floor_model, decoded, cli_refs, cli_neurons, args.batch))

        cli(args, floor_for)


def cli(args, floor_seconds_for):
    """The relevance stage through the command line, start-up subtracted, against the floor on its images."""
    import subprocess
    import sys

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale import make_images

    tmp = Path(tempfile.mkdtemp(prefix="polypure-cli-"))
    make_images(tmp / "images", args.images)
    neurons = list(range(0, 512, 512 // args.neurons))[:args.neurons]
    config = {"name": "cli", "store": str(tmp / "cli.h5"), "device": "cpu",
              "model": {"name": "torchvision:resnet34", "weights": None},
              "data": {"kind": "imagefolder", "root": str(tmp / "images"), "image_size": 224, "resize": 224,
                       "batch_size": 16, "num_workers": 0},
              "topk": {"layers": ["block_3"], "k": args.refs},
              "relevance": {"target_layer": "block_3", "neurons": neurons, "n_refs": args.refs,
                            "attribution_layers": ["block_0", "block_1", "block_2"], "batch_size": args.batch},
              "report": {"enabled": False}}
    (tmp / "cli.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "polypure", "run", str(tmp / "cli.yaml"), "-q"]
    subprocess.run([*command, "--stages", "topk"], check=True)

    def timed():
        start = time.perf_counter()
        subprocess.run([*command, "--stages", "relevance"], check=True)
        return time.perf_counter() - start

    fresh, skip = [], []
    for _ in range(args.repeats):
        with h5py.File(tmp / "cli.h5", "a") as f:
            if "relevance" in f:
                del f["relevance"]
        fresh.append(timed())
        skip.append(timed())
    with h5py.File(tmp / "cli.h5", "r") as f:
        refs = f["topk/block_3/indices"][()][neurons, :args.refs]
    from polypure.config.settings import config_from_dict
    from polypure.data.datasets import build_dataset
    from polypure.models.factory import build_model

    built = config_from_dict(config)
    dataset = build_dataset(built.data, build_model(built))
    floor = floor_seconds_for(dataset, refs, neurons)
    # the CLI's stage runs in a fresh process: its first passes also pay for oneDNN building its kernels for
    # every new shape. A floor in a fresh process pays the same; its first pass is timed
    np.save(tmp / "refs.npy", refs)
    script = (f"import sys, time, numpy as np, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "from relevance_speed import bare_pass; from polypure.config.settings import load_config; "
              "from polypure.data.datasets import build_dataset; from polypure.models.factory import build_model; "
              f"c = load_config({str(tmp / 'cli.yaml')!r}); m = build_model(c); d = build_dataset(c.data, m); "
              "x = torch.stack([d[i][0] for i in range(len(d))]); m.module.requires_grad_(False); "
              f"t = time.perf_counter(); bare_pass(m.module, x, np.load({str(tmp / 'refs.npy')!r}), {neurons}, "
              f"{args.batch}); print(time.perf_counter() - t)")
    cold = min(float(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                    text=True).stdout.split()[-1]) for _ in range(args.repeats))
    stage = min(fresh) - min(skip)
    print(f"CLI: relevance run {min(fresh):.2f} s, start-up (the same command, nothing to do) {min(skip):.2f} s")
    print(f"CLI relevance stage (start-up subtracted): {stage:7.2f} s; floor on the same images {floor:.2f} s "
          f"warm, {cold:.2f} s in a fresh process -> {stage / floor:.2f} of the warm floor, {stage / cold:.2f} of "
          "the fresh one (goal <= 1.1, below 1.0 where neurons share references)")


def _timed(fn) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``fn()`` (CPU: this process's, all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _stage_timings(config, repeats: int) -> tuple[dict[str, tuple[float, float]], dict]:
    """Best-of (wall, CPU) seconds of the relevance stage with sharing, without, and of the floor; the sharing."""
    from polypure.attribution import relevance_plan
    from polypure.attribution.relevance_plan import SharingStats, plan_passes

    store = Path(config.store)
    exp = Experiment(config, progress=False)
    exp.topk()
    model, dataset = exp.model, exp.dataset
    exp.close()
    batch = int(config.relevance.batch_size)

    def stage(share_passes):
        with h5py.File(store, "a") as f:
            if "relevance" in f:
                del f["relevance"]
        saved = relevance_plan.SHARE_PASSES
        relevance_plan.SHARE_PASSES = share_passes
        try:
            run = Experiment(config, progress=False)
            _ = run.model, run.dataset      # built outside the timing, as the floor's are
            seconds = _timed(run.relevance)
            run.close()
        finally:
            relevance_plan.SHARE_PASSES = saved
        return seconds

    times = {"shared": [stage(relevance_plan.SHARE_PASSES)], "old": [], "floor": []}
    # the targets as the stage laid them out: neurons in store order, their references, attribution layers
    targets, stats = {}, {}
    with h5py.File(store, "r") as f:
        for name in f["relevance"]:
            neurons = f[f"relevance/{name}/neurons"][()]
            refs = f[f"topk/{name}/indices"][()][neurons, :config.relevance.n_refs]
            depth = sum(key.startswith("block_") for key in f[f"relevance/{name}"])
            targets[name] = (neurons, refs, depth)
            stats[name] = SharingStats()
            for _, planned, _ in plan_passes(refs, np.arange(len(neurons)), batch, backward_cost=1.25):
                stats[name].add(planned)
    unique = np.unique(np.concatenate([refs.reshape(-1) for _, refs, _ in targets.values()]))
    decoded = torch.zeros((int(unique.max()) + 1, *dataset[int(unique[0])][0].shape))
    for i in unique:
        decoded[int(i)] = dataset[int(i)][0]
    net = copy.deepcopy(model.module).requires_grad_(False)

    def floor():
        for name, (neurons, refs, depth) in targets.items():
            # a planted target's virtual neurons cost what as many channels cost
            resnet_floor(net, decoded, refs, neurons, batch, name.split("@")[0], depth)

    for repeat in range(repeats):
        # interleaved, so that a busy moment of the machine does not fall on one of them only
        if repeat:
            times["shared"].append(stage(relevance_plan.SHARE_PASSES))
        times["old"].append(stage(0))
        times["floor"].append(_timed(floor))
    best = {key: (min(t[0] for t in value), min(t[1] for t in value)) for key, value in times.items()}
    return best, stats


def sharing(repeats: int) -> None:
    """The table of ``--sharing``: shared forward passes against the old path and the floor."""
    import sys

    from polypure.config.settings import config_from_dict, load_config

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale import SIZES, make_images
    from scale import config as scale_config

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="polypure-sharing-"))
    logits = "relevance.targets=[{layer: logits, neurons: all, attribution_layers: [block_0, block_1, block_2, block_3]}]"
    cases = {"demo (demo.yaml)": load_config("demo", [f"store={tmp / 'demo.h5'}"]),
             "demo, logits only (nothing shared)": load_config("demo", [f"store={tmp / 'logits.h5'}", logits,
                                                                        "relevance.planted=null"])}
    make_images(tmp / "images", SIZES["small"]["images"])
    small = scale_config(tmp / "images", tmp / "small.h5", SIZES["small"], "local", 1, "cpu")
    small["data"]["num_workers"] = 0
    cases["scale.py --size small"] = config_from_dict(small)
    print(f"{torch.get_num_threads()} thread(s), best of {repeats}, interleaved; old: every pair its own forward "
          "row; floor: a bare per-pair forward + autograd.grad on the same rows")
    header = (f"{'case / target':<36} {'pairs':>6} {'fwd rows':>8} {'shared':>6} | {'floor s':>7} {'old s':>7} "
              f"{'new s':>7} {'old/fl':>6} {'new/fl':>6} {'new/old':>7} | CPU: {'old/fl':>6} {'new/fl':>6} "
              f"{'new/old':>7}")
    print(header)
    print("-" * len(header))
    for label, config in cases.items():
        # the case of 200 pairs takes a fifth of a second: more repeats, for a steady best
        times, stats = _stage_timings(config, repeats * 5 if "logits only" in label else repeats)
        for name, stat in stats.items():
            print(f"  {name:<34} {stat.pairs:6d} {stat.forward_rows:8d} {stat.shared:6.0%} |")
        pairs = sum(stat.pairs for stat in stats.values())
        forward = sum(stat.forward_rows for stat in stats.values())
        (floor, floor_cpu), (old, old_cpu), (new, new_cpu) = times["floor"], times["old"], times["shared"]
        print(f"{label:<36} {pairs:6d} {forward:8d} {1 - forward / pairs:6.0%} | {floor:7.2f} {old:7.2f} {new:7.2f} "
              f"{old / floor:6.2f} {new / floor:6.2f} {new / old:7.2f} | CPU: {old_cpu / floor_cpu:6.2f} "
              f"{new_cpu / floor_cpu:6.2f} {new_cpu / old_cpu:7.2f}")
    print("goal: new / floor <= 0.8; new / old <= 1 where nothing is shared")


if __name__ == "__main__":
    main()
