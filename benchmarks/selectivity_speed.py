"""Selectivity stage speed: each neuron's ablations in passes of its own, against neurons sharing passes.

The demo ResNet (shipped weights), ``--neurons`` neurons of ``block_3`` with 50 references each (random inputs)
and the demo's 13 keep masks per neuron (the unablated neuron, and for each of 2 clusters its circuit and 5 random
sets of 8 channels), ablated at ``block_0`` and at ``block_2``. Two timings, in one process, alternated:

* alone: one :meth:`~polypure.attribution.ablation.Ablation.batch` call per neuron with ``batch_size`` 512 (the
  default): 650 rows, two passes per neuron;
* shared: one call for all the neurons with ``batch_size`` 2048 (``configs/demo_disentangle.yaml``): three
  neurons' rows per pass.

Both give the same activations (checked). Run: ``python benchmarks/selectivity_speed.py [--neurons 12]
[--repeats 3]``; the printed ratio is the result (each timing the best of ``--repeats``), and the load average
beside it, since a CPU other processes share slows many small operations more than a few large ones.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from polypure.attribution.ablation import Ablation, ChannelMasks, Request, channel_activation
from polypure.models.factory import create_model

REFS, MASKS, CHANNELS = 50, 13, {"block_0": 16, "block_2": 64}


def main():
    # beside this file: the relevance benchmark's timer
    from relevance_speed import best_of

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = create_model("demo_resnet", weights="DEFAULT")
    rng = np.random.default_rng(0)
    images = [torch.randn(REFS, 3, 64, 64, generator=torch.Generator().manual_seed(n)) for n in range(args.neurons)]
    print(f"demo ResNet, {args.neurons} neurons x {REFS} references x {MASKS} ablations, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    for layer, channels in CHANNELS.items():
        keep = []
        for _ in range(args.neurons):
            masks = np.ones((MASKS, channels), bool)
            for row in masks[1:]:
                row[rng.choice(channels, 8, replace=False)] = False
            keep.append(masks)
        requests = [Request(x, ChannelMasks(k), channel_activation(n, "max"))
                    for n, (x, k) in enumerate(zip(images, keep))]
        alone = Ablation(model.module, layer, model.submodule(layer), model.submodule("block_3"), batch_size=512)
        shared = Ablation(model.module, layer, model.submodule(layer), model.submodule("block_3"), batch_size=2048)
        found = shared.batch(requests)
        for request, values in zip(requests, found):
            np.testing.assert_allclose(alone.batch([request])[0], values, rtol=1e-4, atol=1e-5)
        runs = {"alone": lambda alone=alone, requests=requests: [alone.batch([r]) for r in requests],
                "shared": lambda shared=shared, requests=requests: shared.batch(requests)}
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(best_of(1, run))
        best = {name: min(values) for name, values in times.items()}
        print(f"{layer}: alone {best['alone']:.2f} s, shared {best['shared']:.2f} s: "
              f"{best['alone'] / best['shared']:.2f}x (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
