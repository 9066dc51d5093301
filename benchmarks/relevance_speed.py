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
    rows = torch.as_tensor(refs.reshape(-1))
    row_neurons = torch.as_tensor(np.repeat(neurons, refs.shape[1]))
    for start in range(0, len(rows), batch):
        x = images[rows[start:start + batch]]
        k = row_neurons[start:start + batch]
        with torch.no_grad():
            stem = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        a1 = m.layer1(stem).requires_grad_(True)
        a2 = m.layer2(a1)
        a3 = m.layer3(a2)
        a4 = m.layer4(a3)
        grad = torch.zeros_like(a4)
        index = torch.arange(len(x))
        grad[index, k] = a4.detach()[index, k].clamp(min=0)
        torch.autograd.grad(a4, [a1, a2, a3], grad)


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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
