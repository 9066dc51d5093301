"""Top-K stage speed against a decode + forward floor and against zennit-crp's ``FeatureVisualization.run``.

ResNet-34 (random weights), N JPEG images at 224 px (generated into a temporary folder), top-K of the four
blocks (block_0..block_3 = layer1..layer4). Three timings, in one process:

* polypure: ``Experiment.topk()`` on an image-folder config (decoding, hooks, top-K, checkpoints and
  store writes included; the model and data already built);
* floor: the same data loader (decode, resize, normalise) and a bare forward to layer4, no hooks;
* published: zennit-crp's ``FeatureVisualization.run`` with a channel concept on the same four layers
  (the way crp's users find reference samples: it collects activation and relevance maxima, so it also
  runs a backward pass per sample), on the first ``--crp-images`` images, compared per image.

Run: ``python benchmarks/topk_speed.py [--images 256] [--crp-images 32] [--repeats 2]``. The printed
ratios are the result; each timing is the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from polypure import Experiment

LAYERS = {"block_0": "layer1", "block_1": "layer2", "block_2": "layer3", "block_3": "layer4"}


def main():
    # beside this file: the study benchmark's image generator, the relevance benchmark's timer
    from relevance_speed import best_of
    from scale import make_images

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--crp-images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="polypure-topk-"))
    make_images(tmp / "images", args.images)
    config = {"name": "topk", "store": str(tmp / "topk.h5"), "device": "cpu",
              "model": {"name": "torchvision:resnet34", "weights": None},
              "data": {"kind": "imagefolder", "root": str(tmp / "images"), "image_size": 224, "resize": 224,
                       "batch_size": args.batch, "num_workers": 2},
              "topk": {"layers": list(LAYERS), "k": 16}, "relevance": {"n_refs": 16}}
    exp = Experiment(config, progress=False, overwrite=True)
    exp.validate()
    model, dataset = exp.model.module, exp.dataset
    print(f"ResNet-34 (random weights), {args.images} JPEG images at 224 px, top-K of 4 layers, "
          f"{torch.get_num_threads()} threads")

    def ours():
        (tmp / "topk.h5").unlink(missing_ok=True)
        exp.topk()

    def floor():
        with torch.no_grad():
            for x, _ in DataLoader(dataset, batch_size=args.batch, num_workers=2):
                m = model
                m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))

    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from crp.visualization import FeatureVisualization
    from zennit.core import Composite

    def published():
        attribution = CondAttribution(model)
        fv = FeatureVisualization(attribution, Subset(dataset, range(args.crp_images)),
                                  {name: ChannelConcept() for name in LAYERS.values()}, max_target="max",
                                  path=str(tmp / "crp"))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fv.run(Composite(), 0, args.crp_images, batch_size=args.batch)

    t_floor = best_of(args.repeats, floor)
    t_ours = best_of(args.repeats, ours)
    t_crp = best_of(max(1, args.repeats - 1), published)
    per_ours, per_crp = t_ours / args.images, t_crp / args.crp_images
    print(f"polypure top-K stage       : {t_ours:7.2f} s  ({args.images / t_ours:6.1f} images/s)")
    print(f"floor (decode + forward)   : {t_floor:7.2f} s  -> polypure / floor = {t_ours / t_floor:.2f} (goal <= 1.15)")
    print(f"crp FeatureVisualization.run: {t_crp:6.2f} s on {args.crp_images} images -> polypure is "
          f"{per_crp / per_ours:.1f}x faster per image (goal >= 10x)")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
