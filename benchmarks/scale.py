"""The seed paper's study at full size, stage by stage, against the floor of each stage in the same process.

ResNet-34 (random weights), Imagenette-sized data (3925 JPEG images, 224 px, ten class folders, generated
once into a temporary folder), top-K of block_0..block_3, 512 neurons of block_3 x 50 references at
block_0..block_2, CLIP ViT-B-32 and DINOv2-base embeddings of the references (random weights), k-means,
metrics and the report. Each stage's seconds and throughput are printed next to a floor measured here:

* top-K: decode + a bare forward to block_3 (no hooks, no top-K), images/s;
* relevance: a bare forward to block_3 plus one ``torch.autograd.grad`` per batch of (neuron, reference)
  rows, the images already decoded, no hooks and no sharing, pairs/s;
* embeddings: a bare forward of each evaluator's network on already prepared images, images/s.

Run ``python benchmarks/scale.py`` (full size, meant for a GPU), ``--size small`` for a CPU, and
``--executor ray --workers N`` for the same run on Ray (``--executor both`` runs both and prints Ray's
overhead; the two runs alternate stage by stage, each keeping its Ray workers or its in-process model from
its first stage to its last, so that a busy moment of the machine weighs on both). Needs the ``ray`` extra for Ray. ``--repeats N`` runs
each executor N times and keeps each stage's best time (a machine other work shares slows one run or
another).

Next to each stage's seconds, its CPU seconds: those of this process and of every process below it (data
loader workers; with Ray its daemons and worker processes, which a local Ray started here has as
descendants), sampled with ``psutil`` (:class:`TreeCPU`). A second view on a shared machine: other work stretches wall-clock
seconds, and it inflates CPU seconds less (though threads that spin while they wait for each other count).
With ``both``, the idle Ray processes' few CPU seconds during a local stage count to the local stage.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from polypure import Experiment
from polypure.pipeline.stages import NAMES

SIZES = {
    # images, neurons, references (= k), relevance rows per backward pass, images per top-K / embedding batch
    "full": dict(images=3925, neurons=512, refs=50, rows=256, batch=128),
    "small": dict(images=256, neurons=16, refs=16, rows=64, batch=32),
}
LAYERS = ["block_0", "block_1", "block_2"]


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` 224 px JPEG images in ten class folders: smooth colour fields with random bars and blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    for i in range(n):
        label = i % 10
        base = rng.uniform(0, 1, 3)
        image = base + 0.3 * np.sin(2 * np.pi * (rng.uniform(1, 6) * xx[..., None] + rng.uniform(0, 1, 3)))
        for _ in range(rng.integers(1, 5)):
            cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.25)]
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
        image += rng.normal(0, 0.05, image.shape)
        out = folder / f"class_{label}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(out / f"{i:05d}.jpg", quality=90)


def config(root: Path, store: Path, size: dict, executor: str, workers: int, device: str) -> dict:
    step = 512 // size["neurons"]
    return {
        "name": "scale", "store": str(store), "device": device, "seed": 0,
        "model": {"name": "torchvision:resnet34", "weights": None},
        "data": {"kind": "imagefolder", "root": str(root), "image_size": 224, "resize": 224,
                 "batch_size": size["batch"], "num_workers": 2},
        "topk": {"layers": ["block_0", "block_1", "block_2", "block_3"], "k": size["refs"]},
        "relevance": {"target_layer": "block_3", "neurons": list(range(0, 512, step))[:size["neurons"]],
                      "attribution_layers": LAYERS, "n_refs": size["refs"], "batch_size": size["rows"]},
        "cluster": {"methods": [{"name": "kmeans", "n_clusters": 2}]},
        "evaluate": {"references": ["clip", "dinov2"], "batch_size": size["batch"],
                     "clip": {"model": "ViT-B-32", "pretrained": None},
                     "dinov2": {"model": "vit_base_patch14_dinov2.lvd142m", "pretrained": False},
                     "ground_truth": ["class"]},
        "report": {"neurons": 4},
        "executor": {"kind": executor, "workers": workers, "shard_size": 4 * size["batch"],
                     "gpus_per_worker": 1.0 / workers if device != "cpu" and torch.cuda.is_available() else 0.0},
    }


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class TreeCPU:
    """CPU seconds of this process and its descendants, sampled every ``every`` seconds on a thread.

    A process keeps the CPU seconds it was last seen with after it ends (Ray's worker processes come and go,
    and a process that ends is no longer anyone's child to ask); what it used after the last sample is lost.
    Without psutil, zero.
    """

    def __init__(self, every: float = 0.5):
        import threading

        try:
            import psutil
        except ImportError:
            psutil = None
        self.psutil = psutil
        self.seen: dict[tuple[int, float], float] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        if psutil is not None:
            self.thread.start()

    def _run(self, every: float) -> None:
        while not self.stopped.wait(every):
            self.sample()

    def sample(self) -> None:
        if self.psutil is None:
            return
        me = self.psutil.Process()
        for process in [me, *me.children(recursive=True)]:
            try:
                with process.oneshot():
                    key, t = (process.pid, process.create_time()), process.cpu_times()
            except self.psutil.Error:  # ended meanwhile
                continue
            with self.lock:
                self.seen[key] = t.user + t.system

    def __call__(self) -> float:
        """CPU seconds so far."""
        self.sample()
        with self.lock:
            return sum(self.seen.values())

    def stop(self) -> None:
        self.stopped.set()


def run_stages(configs: dict[str, dict]) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Per config: seconds and CPU seconds (:class:`TreeCPU`) of start-up (config, model, data) and of every stage.

    With two configs (local and Ray) the runs alternate stage by stage, so that what else the machine does
    weighs on both alike; each keeps its executor from its first stage to its last.
    """
    times = {kind: {} for kind in configs}
    cpu = {kind: {} for kind in configs}
    experiments = {}
    tree_cpu = TreeCPU()
    try:
        for kind, cfg in configs.items():
            start, used = time.perf_counter(), tree_cpu()
            experiments[kind] = Experiment(cfg, progress=False, overwrite=True)
            experiments[kind].validate()
            times[kind]["start-up"], cpu[kind]["start-up"] = time.perf_counter() - start, tree_cpu() - used
        for stage in NAMES:
            for kind, exp in experiments.items():
                start, used = time.perf_counter(), tree_cpu()
                getattr(exp, stage)()
                sync(exp.device)
                times[kind][stage], cpu[kind][stage] = time.perf_counter() - start, tree_cpu() - used
    finally:
        tree_cpu.stop()
        for exp in experiments.values():
            exp.close()
    return {kind: (times[kind], cpu[kind]) for kind in configs}


def floors(cfg: dict, store: Path) -> dict[str, float]:
    """Seconds of each stage's floor (see the module's docstring) on the same data and device."""
    import h5py
    from torch.utils.data import DataLoader

    from polypure.config.settings import config_from_dict
    from polypure.data.datasets import build_dataset
    from polypure.evaluation.evaluators import as_rgb, make_evaluator, prepare
    from polypure.models.factory import build_model

    config = config_from_dict(cfg)
    device = torch.device("cuda" if cfg["device"] == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg["device"] == "auto" else cfg["device"]))
    model = build_model(config, device)
    net = model.module
    dataset = build_dataset(config.data, model)
    out = {}

    def to_block3(x):
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in DataLoader(dataset, batch_size=config.data.batch_size, num_workers=config.data.num_workers):
            to_block3(x.to(device))
    sync(device)
    out["topk"] = time.perf_counter() - start

    with h5py.File(store, "r") as f:
        neurons = f["relevance/block_3/neurons"][()]
        indices = f["topk/block_3/indices"][()][neurons, :config.relevance.n_refs]
    unique = np.unique(indices)
    images = {int(i): dataset[int(i)][0] for i in unique}
    rows = torch.as_tensor(indices.reshape(-1))
    row_neurons = torch.as_tensor(np.repeat(neurons, indices.shape[1]))
    net.requires_grad_(False)
    batch = config.relevance.batch_size
    start = time.perf_counter()
    for s in range(0, len(rows), batch):
        x = torch.stack([images[int(i)] for i in rows[s:s + batch]]).to(device)
        k = row_neurons[s:s + batch].to(device)
        with torch.no_grad():
            stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        a1 = net.layer1(stem).requires_grad_(True)
        a2 = net.layer2(a1)
        a3 = net.layer3(a2)
        a4 = net.layer4(a3)
        grad = torch.zeros_like(a4)
        index = torch.arange(len(x), device=device)
        grad[index, k] = a4.detach()[index, k].clamp(min=0)
        torch.autograd.grad(a4, [a1, a2, a3], grad)
    sync(device)
    out["relevance"] = time.perf_counter() - start

    embed = 0.0
    pixels = [as_rgb(dataset.view(int(i))) for i in unique]
    for name in ("clip", "dinov2"):
        evaluator = make_evaluator(name, config.evaluate.settings(name))
        evaluator.device = device
        evaluator.embed_images(pixels[:1])  # loads the network
        if name == "clip":
            forward, size, mean, std = evaluator._visual, evaluator._size, evaluator._mean, evaluator._std
            resize = size
        else:
            s = evaluator.settings
            forward, size, resize = evaluator._model.forward_features, s.image_size, s.resize
            mean, std = evaluator._mean, evaluator._std
        prepared = [prepare(pixels[i:i + config.evaluate.batch_size], resize, size, mean, std)
                    for i in range(0, len(pixels), config.evaluate.batch_size)]
        start = time.perf_counter()
        with torch.no_grad():
            for x in prepared:
                forward(x.to(device))
        sync(device)
        embed += time.perf_counter() - start
    out["embed"] = embed
    out["unique"] = len(unique)
    return out


def show(label: str, times: dict[str, float], cpu: dict[str, float], floor: dict[str, float], size: dict) -> float:
    pairs = size["neurons"] * size["refs"]
    rates = {"topk": (size["images"], "images/s"), "relevance": (pairs, "pairs/s"),
             "embed": (2 * floor["unique"], "images/s")}
    print(f"\n{label}")
    print(f"{'stage':<10} {'seconds':>8} {'CPU s':>8} {'throughput':>18} {'floor s':>8} {'floor':>18} {'/ floor':>8}")
    for stage, seconds in times.items():
        line = f"{stage:<10} {seconds:8.2f} {cpu[stage]:8.2f}"
        if stage in rates:
            count, unit = rates[stage]
            line += (f" {count / seconds:10.1f} {unit:<7} {floor[stage]:8.2f} {count / floor[stage]:10.1f} {unit:<7}"
                     f" {seconds / floor[stage]:8.2f}")
        print(line)
    total = sum(times.values())
    print(f"{'total':<10} {total:8.2f} {sum(cpu.values()):8.2f}")
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--executor", choices=["local", "ray", "both"], default="local")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", type=Path, default=None, help="reuse (or make) the image folder here")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each executor, alternating; each stage's best time is kept")
    args = parser.parse_args()
    size = SIZES[args.size]
    tmp = Path(tempfile.mkdtemp(prefix="polypure-scale-"))
    root = args.data or tmp / "images"
    if not root.is_dir() or sum(1 for _ in root.rglob("*.jpg")) != size["images"]:
        start = time.perf_counter()
        make_images(root, size["images"])
        print(f"generated {size['images']} JPEG images in {time.perf_counter() - start:.1f} s ({root})")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    print(f"ResNet-34 (random weights), {size['images']} images at 224 px, {size['neurons']} neurons x "
          f"{size['refs']} references x {len(LAYERS)} layers, CLIP ViT-B-32 + DINOv2-base (random weights); "
          f"device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else
             f", {torch.get_num_threads()} threads"))
    kinds = ["local", "ray"] if args.executor == "both" else [args.executor]
    totals, floor, best, best_cpu = {}, None, {}, {}
    work = ("topk", "relevance", "embed")
    for _ in range(args.repeats):
        runs = run_stages({kind: config(root, tmp / f"{kind}.h5", size, kind, args.workers, device) for kind in kinds})
        for kind, (times, cpu) in runs.items():
            best[kind] = {stage: min(seconds, best.get(kind, {}).get(stage, seconds)) for stage, seconds in times.items()}
            best_cpu[kind] = {stage: min(seconds, best_cpu.get(kind, {}).get(stage, seconds))
                              for stage, seconds in cpu.items()}
        if floor is None:
            store = tmp / f"{kinds[0]}.h5"
            floor = floors(config(root, store, size, "local", args.workers, device), store)
    for kind in kinds:
        times, cpu = best[kind], best_cpu[kind]
        label = ("local" if kind == "local" else f"ray, {args.workers} workers") + (
            f", best of {args.repeats}" if args.repeats > 1 else "")
        totals[kind] = (show(label, times, cpu, floor, size), sum(times[s] for s in work),
                        sum(cpu[s] for s in work))
    if len(totals) == 2:
        (local, local_work, local_cpu), (ray, ray_work, ray_cpu) = totals["local"], totals["ray"]
        print(f"\nRay's overhead: {ray / local - 1:+.1%} of the whole run, {ray_work / local_work - 1:+.1%} of "
              f"top-K + relevance + embed (goal: at most +15%); in CPU seconds {ray_cpu / local_cpu - 1:+.1%} of "
              "top-K + relevance + embed")


if __name__ == "__main__":
    main()
