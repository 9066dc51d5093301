"""Ablation passes with glibc's default allocator against :func:`polypure.allocator.keep_freed_memory`.

EfficientNet-Lite0 (random weights: the speed does not depend on them), ``--neurons`` neurons of ``head`` with 50
references each (random 224 px inputs) and 13 keep masks per neuron (the unablated neuron, and for each of 2
clusters its circuit and 5 random sets of 8 channels), ablated at ``block_4`` with the selectivity stage's
default ``batch_size`` of 512 rows: the work of ``configs/lite0_disentangle.yaml``'s selectivity stage.

The allocator is a setting of the whole process, so the two timings run in child processes, alternated
``--repeats`` times: ``default`` with ``POLYPURE_KEEP_FREED_MEMORY=0``, ``kept`` with polypure's setting. Each child
times the passes after one warm-up neuron and prints wall, user and system seconds and its minor page faults;
the ratio of the best wall times is the result. Run: ``python benchmarks/allocator_speed.py [--neurons 4]
[--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REFS, MASKS, LAYER, TARGET = 50, 13, "block_4", "head"


def child(neurons: int) -> None:
    """One timing in this process, printed as a JSON line."""
    import resource
    import time

    import numpy as np
    import torch

    from polypure.allocator import keep_freed_memory
    from polypure.attribution.ablation import Ablation, ChannelMasks, Request, channel_activation
    from polypure.attribution.hooks import forward_to, tap_layers
    from polypure.models.factory import create_model

    kept = keep_freed_memory()
    model = create_model("efficientnet_lite0", weights=None)
    with torch.no_grad(), tap_layers({LAYER: model.submodule(LAYER)}) as outputs:
        forward_to(model.module, torch.zeros(1, 3, 224, 224), outputs)
    channels = outputs[LAYER].shape[1]
    ablation = Ablation(model.module, LAYER, model.submodule(LAYER), model.submodule(TARGET), batch_size=512)
    rng = np.random.default_rng(0)
    images = torch.randn(REFS, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def requests(count: int) -> list:
        out = []
        for neuron in range(count):
            keep = np.ones((MASKS, channels), bool)
            for row in keep[1:]:
                row[rng.choice(channels, 8, replace=False)] = False
            out.append(Request(images, ChannelMasks(keep), channel_activation(neuron, "max")))
        return out

    ablation.batch(requests(1))
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    ablation.batch(requests(neurons))
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"kept": kept, "wall": wall, "user": after.ru_utime - before.ru_utime,
                      "system": after.ru_stime - before.ru_stime, "faults": after.ru_minflt - before.ru_minflt}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.neurons)
        return
    print(f"EfficientNet-Lite0, {args.neurons} neurons x {REFS} references x {MASKS} ablations at {LAYER}, "
          f"batch 512, load {os.getloadavg()[0]:.1f}")
    best = {}
    for _ in range(args.repeats):
        for name, value in (("default", "0"), ("kept", "1")):
            done = subprocess.run([sys.executable, __file__, "--child", "--neurons", str(args.neurons)],
                                  env={**os.environ, "POLYPURE_KEEP_FREED_MEMORY": value}, check=True,
                                  capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name:8s} wall {result['wall']:6.1f} s  user {result['user']:6.1f} s  system "
                  f"{result['system']:6.1f} s  minor faults {result['faults']:>10,d}  (allocator kept memory: "
                  f"{result['kept']})")
            if name not in best or result["wall"] < best[name]["wall"]:
                best[name] = result
    print(f"kept / default, wall: {best['kept']['wall'] / best['default']['wall']:.2f} "
          f"(load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
