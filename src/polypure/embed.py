"""The embed stage: evaluator embeddings of every target's references (``/embeddings/<evaluator>/<target>``).

With the crop view the crop boxes are kept too (``/crops/<target>`` (M, n_refs, 4) int64: row start, row
stop, column start, column stop in the view's pixels; -1 where the whole image is used), so that figures
can show the same crops without the model.

Rows are aligned with ``/relevance/<target>``: row m, column r is the r-th reference of ``neurons[m]``.
With the ``full`` view each distinct image is embedded once, however many neurons and targets use it.
With the ``crop`` view (PURE) every (neuron, reference) pair is first cropped to where the neuron's CRP
heatmap is: the heatmap of the neuron's unit at its most active position, computed with
``crop_composite`` (EpsilonPlusFlat by default), blurred, thresholded at 2 % of its maximum, squared, as
in PURE's ``crop_and_mask_images``.

Example
-------
>>> from polypure import Experiment          # doctest: +SKIP
>>> Experiment("configs/paper_resnet34_imagenette.yaml").embed()   # doctest: +SKIP
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torchvision.transforms.functional import gaussian_blur
from tqdm.auto import tqdm

from .attribution import INPUT, ConditionalRelevance
from .composites import input_bounds, make_composite, times_activation, warn_uncanonized
from .evaluate import reference_indices
from .evaluators import as_rgb, make_evaluator


def evaluator_names(config, relevance_spaces: set[str] = frozenset()) -> list[str]:
    """Evaluators to run: the references, then evaluator spaces named in ``cluster.spaces``."""
    names = list(config.evaluate.references)
    for space in config.cluster.spaces or []:
        if space not in relevance_spaces and space != "activation" and space not in names:
            names.append(space)
    return names


def crop_box(heatmap: torch.Tensor, crop_th: float = 0.02, kernel_size: int = 5):
    """Rows and columns to crop a reference to, from its input heatmap (H, W), as PURE does.

    The heatmap is blurred, made absolute and divided by its maximum; the box spans where it exceeds
    ``crop_th`` and is widened to a square. Returns None where the heatmap is empty.
    """
    blurred = gaussian_blur(heatmap[None, None], kernel_size=kernel_size)[0, 0].abs()
    top = blurred.max()
    if not top > 0:
        return None
    rows, cols = torch.where(blurred / top > crop_th)
    if len(rows) == 0:
        return None
    r1, r2, c1, c2 = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
    if r1 >= r2 and c1 >= c2:
        return None
    dr, dc = r2 - r1, c2 - c1
    if dr > dc:
        c1, c2 = c1 - (dr - dc) // 2, c2 + (dr - dc) // 2
        if c1 < 0:
            c2, c1 = c2 - c1, 0
    elif dc > dr:
        r1, r2 = r1 - (dc - dr) // 2, r2 + (dc - dr) // 2
        if r1 < 0:
            r2, r1 = r2 - r1, 0
    # like PURE, the end index is exclusive: the last row / column of the range is left out
    return r1, r2, c1, c2


def crop(image: torch.Tensor, box) -> torch.Tensor:
    """The image cut to ``box``; the whole image when the box is empty or cuts nothing visible."""
    if box is None:
        return image
    r1, r2, c1, c2 = box
    cut = image[..., r1:r2, c1:c2]
    return cut if cut.numel() > 0 and cut.sum() != 0 else image


def _single_unit(init):
    """Restrict an initial relevance to the unit (position) where it is largest, per row."""
    def masked(target: torch.Tensor) -> torch.Tensor:
        grad = init(target)
        if grad.ndim <= 2:
            return grad
        per_position = grad.sum(1).flatten(1)
        best = per_position.argmax(1)
        mask = torch.zeros_like(per_position)
        mask[torch.arange(len(mask)), best] = 1
        return grad * mask.view(len(grad), 1, *grad.shape[2:])
    return masked


def crop_heatmaps(ctx, plan, refs: np.ndarray, composite_name: str,
                  key: str = "crop_composite") -> dict[tuple[int, int], tuple]:
    """Crop boxes for every (row, reference) of a target, from single-unit CRP heatmaps at the input.

    ``key`` is the config key that names the composite, for error messages.
    """
    model = ctx.model
    canonizers = list(ctx.config.relevance.canonizers) or list(model.canonizers)
    warn_uncanonized(model.module, composite_name, canonizers,
                     sample=ctx.dataset[0][0].unsqueeze(0).to(ctx.device))
    composite = make_composite(composite_name, canonizers, bounds=lambda: input_bounds(ctx.dataset), key=key)
    engine = ConditionalRelevance(model.module, {plan.layer: model.submodule(plan.layer)}, {INPUT: model.module},
                                  composite=composite, times_activation=times_activation(composite_name))
    boxes = {}
    n_refs = refs.shape[1]
    batch = max(1, ctx.config.relevance.batch_size)
    with engine:
        for start in range(0, len(plan.neurons), max(1, batch // n_refs)):
            rows = np.arange(start, min(start + max(1, batch // n_refs), len(plan.neurons)))
            samples = refs[rows].reshape(-1)
            unique, local = np.unique(samples, return_inverse=True)
            images = torch.stack([ctx.dataset[int(i)][0] for i in unique]).to(ctx.device)
            neurons = torch.as_tensor(np.repeat(plan.neurons[rows], n_refs))
            out = engine(images, torch.as_tensor(local), _single_unit(plan.make_init(neurons)), keep_maps=(INPUT,))
            heatmaps = out.maps[INPUT].sum(1).cpu()
            for j, (row, col) in enumerate((r, c) for r in rows for c in range(n_refs)):
                boxes[(int(row), col)] = crop_box(heatmaps[j])
    return boxes


def run_stage(ctx) -> None:
    """Embed the references of every target with every evaluator the config uses."""
    from .relevance import plan_targets

    with ctx.open_store() as store:
        targets = store.relevance_targets()
        layers = {name for t in targets for name in store.file[f"relevance/{t}"].keys()}
        names = evaluator_names(ctx.config, layers)
        if not names:
            ctx.log("embed: no evaluator configured (evaluate.references), skipped")
            return
        if ctx.dataset.labels_from_items:
            # the top-K pass collected them from the items, maybe in another process
            ctx.dataset.labels = store.labels()
        plans = None
        for name in names:
            evaluator = make_evaluator(name, ctx.config.evaluate.settings(name))
            if evaluator.settings.device is None:
                evaluator.device = ctx.device
            signature = evaluator.signature()
            if evaluator.image_based and ctx.dataset.pixels_signature is not None:
                # the config does not say how an in-memory dataset's pixels are made; other pixels, other embedding
                signature["pixels"] = ctx.dataset.pixels_signature
            signature = json.dumps(signature, sort_keys=True)
            cache: dict[int, np.ndarray] = {}
            for target in targets:
                path = f"embeddings/{name}/{target}"
                if path in store and store.file[path].attrs.get("signature") == signature:
                    continue
                refs = reference_indices(store, target)
                if evaluator.view == "full":
                    missing = np.array([i for i in np.unique(refs) if int(i) not in cache], np.int64)
                    for start in tqdm(range(0, len(missing), ctx.config.evaluate.batch_size),
                                      desc=f"embed {name} {target}", disable=not ctx.progress, leave=False):
                        chunk = missing[start:start + ctx.config.evaluate.batch_size]
                        for i, vector in zip(chunk, evaluator.embed_samples(ctx.dataset, chunk, len(chunk))):
                            cache[int(i)] = vector
                    embeddings = np.stack([np.stack([cache[int(i)] for i in row]) for row in refs])
                else:
                    plans = plans or {p.name: p for p in plan_targets(ctx)}
                    boxes = crop_heatmaps(ctx, plans[target], refs, evaluator.settings.crop_composite,
                                          key=f"evaluate.{name}.crop_composite")
                    store.write_array(f"crops/{target}", np.array(
                        [[boxes[(m, r)] or (-1, -1, -1, -1) for r in range(refs.shape[1])] for m in range(len(refs))],
                        np.int64), attrs={"composite": evaluator.settings.crop_composite,
                                          "columns": ["row_start", "row_stop", "col_start", "col_stop"]})
                    rows = []
                    for m in tqdm(range(len(refs)), desc=f"embed {name} {target} (crops)",
                                  disable=not ctx.progress, leave=False):
                        crops = [crop(as_rgb(ctx.dataset.view(int(i))), boxes[(m, r)]) for r, i in enumerate(refs[m])]
                        rows.append(evaluator.embed_images(crops).float().cpu().numpy())
                    embeddings = np.stack(rows)
                store.write_array(path, embeddings.astype(np.float32),
                                  attrs={"view": evaluator.view, "signature": signature,
                                         "evaluator": type(evaluator).__name__})
                store.flush()
                ctx.log(f"embed {name}: {target} {embeddings.shape}")
