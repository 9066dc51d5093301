"""The embed stage: evaluator embeddings of every target's references (``/embeddings/<evaluator>/<target>``).

Rows are aligned with ``/relevance/<target>``: row m, column r is the r-th reference of ``neurons[m]``.
With the ``full`` view each distinct image is embedded once, however many neurons and targets use it;
with the ``crop`` view (PURE) every (neuron, reference) pair is first cut to its heatmap
(:mod:`polypure.attribution.crops`), and the boxes are kept in ``/crops/<target>``. Embeddings already stored with the
same evaluator signature are kept.

Whatever an evaluator returns, here or from a Ray worker (:func:`polypure.pipeline.work_units.embed_chunk`), is checked
where it arrives: it must be one finite vector per sample (:func:`checked`), or the stage stops with one
line naming the evaluator, before anything of that target is written.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from polypure.errors import InputError

if TYPE_CHECKING:
    from polypure.pipeline.context import StageContext

NAME = "embed"
WRITES = True
HELP = "embed the references with the configured evaluators (CLIP, DINOv2, labels)"


def checked(name: str, target: str, vectors, count: int) -> np.ndarray:
    """An evaluator's output for ``count`` samples, refused unless it is ``(count, D)`` finite numbers.

    A plugin that returns another shape would otherwise misalign references and embeddings without a word
    (or fail later, far from its cause).

    Parameters
    ----------
    name : str
        The evaluator's name in the config.
    target : str
        The target whose references were embedded.
    vectors : array_like
        What the evaluator returned.
    count : int
        Samples it was given.

    Returns
    -------
    ndarray, shape (count, D)

    Raises
    ------
    InputError
        Naming the evaluator, the target, the shape returned and the shape expected.
    """
    try:
        array = np.asarray(vectors)
    except (TypeError, ValueError, RuntimeError):  # ragged lists, tensors that cannot leave their device
        array = np.asarray(None)
    if array.dtype.kind not in "biuf":
        raise InputError(f"evaluate.{name}: the evaluator returned {type(vectors).__name__} for {count} samples of "
                         f"target {target!r}, not an array of numbers; it must return ({count}, D)")
    if array.ndim != 2 or array.shape[0] != count or array.shape[1] == 0:
        raise InputError(f"evaluate.{name}: the evaluator returned an array of shape {array.shape} for {count} "
                         f"samples of target {target!r}; it must return ({count}, D), one vector per sample")
    if not np.isfinite(array).all():
        raise InputError(f"evaluate.{name}: the evaluator returned NaN or infinite values for target {target!r}")
    return array


def run(ctx: StageContext) -> None:
    """Embed the references of every target with every evaluator the config uses."""
    from tqdm.auto import tqdm

    from polypure.attribution.composites import automatic_canonizers
    from polypure.attribution.crops import crop, crop_heatmaps
    from polypure.evaluation.evaluators import as_rgb, evaluator_names, make_evaluator
    from polypure.pipeline.relevance_stage import plans as target_plans

    with ctx.open_store() as store:
        targets = store.relevance_targets()
        layers = {name for t in targets for name in store.spaces(t)} | {d.id for d in ctx.config.dictionaries}
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
                if store.has_embeddings(name, target, signature):
                    continue
                refs = store.reference_indices(target)
                if evaluator.view == "full":
                    missing = np.array([i for i in np.unique(refs) if int(i) not in cache], np.int64)
                    size = ctx.config.evaluate.batch_size
                    chunks = [missing[start:start + size] for start in range(0, len(missing), size)]
                    if ctx.executor is not None and evaluator.image_based:
                        # the same chunks on the workers, each one batch as here
                        done = ctx.executor.embed(name, ctx.config.evaluate.settings(name), chunks)
                    else:
                        done = ((n, evaluator.embed_samples(ctx.dataset, chunk, len(chunk)))
                                for n, chunk in enumerate(chunks))
                    for number, vectors in tqdm(done, total=len(chunks), desc=f"embed {name} {target}",
                                                disable=not ctx.progress, leave=False):
                        vectors = checked(name, target, vectors, len(chunks[number]))
                        for i, vector in zip(chunks[number], vectors):
                            cache[int(i)] = vector
                    embeddings = np.stack([np.stack([cache[int(i)] for i in row]) for row in refs])
                else:
                    plans = plans or {p.name: p for p in target_plans(ctx, store)}
                    plan = plans[target]
                    plan.neurons = store.neurons(target)
                    canonizers = list(ctx.config.relevance.canonizers) or automatic_canonizers(
                        ctx.model, evaluator.settings.crop_composite)
                    boxes = crop_heatmaps(ctx.model, ctx.dataset, plan, refs, evaluator.settings.crop_composite,
                                          canonizers, batch_size=ctx.config.relevance.rows_per_pass, device=ctx.device,
                                          key=f"evaluate.{name}.crop_composite")
                    store.write_crops(target, np.array(
                        [[boxes[(m, r)] or (-1, -1, -1, -1) for r in range(refs.shape[1])] for m in range(len(refs))],
                        np.int64), evaluator.settings.crop_composite)
                    rows = []
                    for m in tqdm(range(len(refs)), desc=f"embed {name} {target} (crops)",
                                  disable=not ctx.progress, leave=False):
                        crops = [crop(as_rgb(ctx.dataset.view(int(i))), boxes[(m, r)]) for r, i in enumerate(refs[m])]
                        rows.append(checked(name, target, evaluator.embed_images(crops).float().cpu().numpy(),
                                            len(crops)))
                    embeddings = np.stack(rows)
                store.write_embeddings(name, target, embeddings, attrs={
                    "view": evaluator.view, "signature": signature, "evaluator": type(evaluator).__name__})
                store.flush()
                ctx.log(f"embed {name}: {target} {embeddings.shape}")
