"""PURE's crop view: each reference cut to where its neuron's CRP heatmap is.

For a (neuron, reference) pair the heatmap of the neuron's unit at its most active position is computed
at the input with ``crop_composite`` (EpsilonPlusFlat by default), blurred, made absolute, thresholded at
2 % of its maximum and widened to a square, as in PURE's ``crop_and_mask_images``. The embed stage embeds
the crops and keeps the boxes in ``/crops/<target>``.

Example
-------
>>> import torch
>>> from polypure.attribution.crops import crop_box
>>> heatmap = torch.zeros(16, 16)
>>> heatmap[4:8, 6:9] = 1.0
>>> crop_box(heatmap, kernel_size=1)
(4, 7, 6, 8)
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.functional import gaussian_blur

from polypure.attribution.composites import input_bounds, make_composite, times_activation, warn_uncanonized
from polypure.attribution.engine import INPUT, ConditionalRelevance


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


def crop_heatmaps(model, dataset, plan, refs: np.ndarray, composite_name: str, canonizers: list[str], *,
                  batch_size: int = 64, device: str | torch.device = "cpu",
                  key: str = "crop_composite") -> dict[tuple[int, int], tuple]:
    """Crop boxes for every (row, reference) of a target, from single-unit CRP heatmaps at the input.

    Parameters
    ----------
    model : ExplainedModel
    dataset : PolypureDataset
    plan : TargetPlan
        The target (its layer and neurons).
    refs : ndarray (M, n_refs)
        Sample index of every reference.
    composite_name : str
        The composite of the heatmaps (PURE: ``epsilon_plus_flat``).
    canonizers : list of str
    batch_size : int
        (neuron, reference) rows per backward pass.
    device : str or torch.device
    key : str
        The config key that names the composite, for error messages.

    Returns
    -------
    dict
        ``(row, reference position) -> box`` (see :func:`crop_box`; None for the whole image).
    """
    warn_uncanonized(model.module, composite_name, canonizers, sample=dataset[0][0].unsqueeze(0).to(device))
    composite = make_composite(composite_name, canonizers, bounds=lambda: input_bounds(dataset), key=key)
    engine = ConditionalRelevance(model.module, {plan.layer: model.submodule(plan.layer)}, {INPUT: model.module},
                                  composite=composite, times_activation=times_activation(composite_name))
    boxes = {}
    n_refs = refs.shape[1]
    per_chunk = max(1, max(1, batch_size) // n_refs)
    with engine:
        for start in range(0, len(plan.neurons), per_chunk):
            rows = np.arange(start, min(start + per_chunk, len(plan.neurons)))
            samples = refs[rows].reshape(-1)
            unique, local = np.unique(samples, return_inverse=True)
            images = torch.stack([dataset[int(i)][0] for i in unique]).to(device)
            neurons = torch.as_tensor(np.repeat(plan.neurons[rows], n_refs))
            out = engine(images, torch.as_tensor(local), _single_unit(plan.make_init(neurons)), keep_maps=(INPUT,))
            heatmaps = out.maps[INPUT].sum(1).cpu()
            for j, (row, col) in enumerate((r, c) for r in rows for c in range(n_refs)):
                boxes[(int(row), col)] = crop_box(heatmaps[j])
    return boxes
