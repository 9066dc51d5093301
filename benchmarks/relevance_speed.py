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

``--cli`` times instead what a user of the command line gets, in fresh processes
(:func:`cli`): ``polypure run CONFIG --stages relevance`` against the floor as a program of its own (imports,
model, decoding, a floor that pays for its cold kernels), the stage alone (the command minus the same
command with nothing to do) against that floor, and where the time of each goes: start-up, cold kernels,
passes, commits, the floor at other batch sizes. Goal: stage / floor <= 1.1.

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
from fresh_process import resnet_floor  # this folder, on the path of a script run from it
from zennit.core import Composite

from polypure import Experiment
from polypure.data.datasets import ArrayDataset

LAYERS = ["layer1", "layer2", "layer3"]


def bare_pass(m, images, refs, neurons, batch):
    """The floor: per batch of (neuron, reference) rows a bare forward to layer4 and one autograd.grad."""
    resnet_floor(m, images, refs, neurons, batch, "block_3", 3)


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
    parser.add_argument("--cli", action="store_true",
                        help="time the stage through the command line against the floor, in fresh processes instead")
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
    if args.cli:
        cli(args)
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


def cli(args) -> None:
    """The relevance stage through the command line against the per-pair floor, each in fresh processes.

    On ``--images`` JPEG files (``scale.py``'s), top-K by the command line first. Per repeat, interleaved:
    ``polypure run CONFIG --stages relevance`` with the relevance deleted; the same command with nothing left
    to do (its start-up: imports, model, data, checks, the store's working copy); the floor as a program of its
    own (:mod:`fresh_process`: imports, ResNet-34, decoding, one floor with cold kernels); the floor again with
    a warm repeat and other batch sizes; the command once more with timers around its parts. Each figure is
    the best of ``--repeats``.
    """
    import json
    import subprocess
    import sys

    import yaml

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    from scale import make_images

    from polypure.config.settings import config_from_dict
    from polypure.data.datasets import build_dataset
    from polypure.models.factory import build_model

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
    command = ["-m", "polypure", "run", str(tmp / "cli.yaml"), "-q", "--stages", "relevance"]
    subprocess.run([sys.executable, *command[:-1], "topk"], check=True)
    with h5py.File(tmp / "cli.h5", "r") as f:
        refs = f["topk/block_3/indices"][()][neurons, :args.refs]
    dataset = build_dataset(config_from_dict(config).data, build_model(config_from_dict(config)))
    job = {"files": [str(f) for f in dataset.files], "refs": refs.tolist(), "neurons": neurons, "size": 224,
           "mean": dataset.mean.flatten().tolist(), "std": dataset.std.flatten().tolist(), "seed": 0,
           "batch": args.batch, "batches": [b for b in (32, 16) if b != args.batch]}
    (tmp / "floor.json").write_text(json.dumps(job))
    (tmp / "extra.json").write_text(json.dumps({**job, "extra": True}))
    helper = str(here / "fresh_process.py")

    def wall(argv) -> tuple[float, str]:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *argv], check=True, capture_output=True, text=True)
        return time.perf_counter() - start, done.stdout

    def drop_relevance():
        with h5py.File(tmp / "cli.h5", "a") as f:
            if "relevance" in f:
                del f["relevance"]

    runs: dict[str, list] = {"run": [], "idle": [], "floor": [], "floor_parts": [], "extra": [], "cli_parts": []}
    for _ in range(args.repeats):
        drop_relevance()
        runs["run"].append(wall(command)[0])
        runs["idle"].append(wall(command)[0])
        seconds, printed = wall([helper, "floor", str(tmp / "floor.json")])
        runs["floor"].append(seconds)
        runs["floor_parts"].append(json.loads(printed))
        runs["extra"].append(json.loads(wall([helper, "floor", str(tmp / "extra.json")])[1]))
        drop_relevance()
        runs["cli_parts"].append(json.loads(wall([helper, "cli", *command[2:]])[1]))

    def best(key, part=None, of=lambda v: v):
        return min(of(r[part]) if part else r for r in runs[key])

    run, idle, floor_process = best("run"), best("idle"), best("floor")
    stage, cold = run - idle, best("floor_parts", "cold")
    print(f"\nCLI, fresh processes, {args.neurons} neurons x {args.refs} references of {args.images} JPEG images, "
          f"{args.batch} rows per pass, best of {args.repeats}:")
    print(f"  polypure run --stages relevance     {run:7.2f} s   (the same command with nothing to do: {idle:.2f} s)")
    print(f"  floor as a program of its own       {floor_process:7.2f} s   -> command / floor program = "
          f"{run / floor_process:.2f}")
    print(f"  relevance stage (run - nothing)     {stage:7.2f} s   floor with cold kernels {cold:.2f} s -> "
          f"stage / floor = {stage / cold:.2f} (goal <= 1.1)")
    sum_of = sum
    parts = {key: best("cli_parts", key, of=sum_of) if isinstance(runs["cli_parts"][0].get(key), list)
             else best("cli_parts", key) for key in runs["cli_parts"][0]}
    first = best("cli_parts", "passes", of=lambda v: v[0])
    commits = min(runs["cli_parts"], key=lambda r: sum(r.get("commits", [])))
    print("  where the command's time goes (timers in a fresh process):")
    print(f"    start-up: imports {parts['imports']:.2f} s, model {parts['build_model']:.2f} s, data "
          f"{parts['build_dataset']:.2f} s, checks {parts['validate'] - parts['build_model'] - parts['build_dataset']:.2f}"
          f" s (one forward of one sample, clusterers, ...), the store's working copy {parts['session_open']:.2f} s")
    print(f"    stage {parts['stage']:.2f} s: compute {parts['compute']:.2f} s in {len(runs['cli_parts'][0]['passes'])} "
          f"passes (the first {first:.2f} s), {len(commits.get('commits', []))} commit(s) "
          f"{sum(commits.get('commits', [])):.2f} s")
    print(f"    floor program: imports {best('floor_parts', 'imports'):.2f} s, model {best('floor_parts', 'build'):.2f} s,"
          f" decoding {best('floor_parts', 'decode'):.2f} s, floor {cold:.2f} s")
    warm = best("extra", "warm")
    print(f"  cold kernels: the floor's first run {best('extra', 'cold'):.2f} s, its repeat in the same process "
          f"{warm:.2f} s ({best('extra', 'cold') - warm:+.2f} s)")
    sizes = ", ".join(f"{size} rows {best('extra', 'batches', of=lambda v, s=size: v[s]):.2f} s"
                      for size in runs["extra"][0]["batches"])
    print(f"  batch size: the warm floor at {args.batch} rows {warm:.2f} s; {sizes}")


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
