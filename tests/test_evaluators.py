"""Evaluators: CLIP and DINOv2 (random weights, offline) and labels.

Also embedding bookkeeping, the reference-space metrics stored per neuron, and the offline error for
weights that cannot be downloaded.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from polypure import Experiment
from polypure.cli import main
from polypure.errors import ConfigError
from polypure.evaluation.evaluators import make_evaluator, prepare
from polypure.evaluation.metrics import cluster_distances, distance_correlation
from polypure.models.hub import HF_HUB, host_reachable

from .helpers import doc_page, random_images
from .nets import tiny

SMALL_DINO = {"evaluator": "dinov2", "model": "vit_small_patch14_dinov2.lvd142m", "pretrained": False}


def test_clip_tokens_pooling_is_the_mean_of_the_last_hidden_states():
    clip = make_evaluator("clip", {"model": "ViT-B-32", "pretrained": None})
    images = [torch.rand(3, 64, 80), torch.rand(3, 50, 50)]
    got = clip.embed_images(images)
    # independently: open_clip's own intermediate outputs of the last block, class token included
    x = prepare(images, 224, 224, clip._mean, clip._std)
    with torch.no_grad():
        out = clip._visual.forward_intermediates(x, indices=1, output_fmt="NLC", output_extra_tokens=True,
                                                 intermediates_only=True)
    tokens = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
    torch.testing.assert_close(got, tokens.mean(1), rtol=1e-4, atol=1e-4)
    assert got.shape == (2, 768)


def test_dinov2_is_the_mean_of_its_final_tokens():
    dino = make_evaluator("dino", SMALL_DINO)
    images = [torch.rand(3, 70, 90)]
    got = dino.embed_images(images)
    model = dino._model
    x = prepare(images, 256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        tokens = model.norm(model.blocks(model._pos_embed(model.patch_embed(x))))
    torch.testing.assert_close(got, tokens.mean(1), rtol=1e-4, atol=1e-4)


def test_labels_evaluator_is_one_hot():
    ds = random_images(6, 8)
    ds.factors = {"shape": (np.array([0, 2, 1, 2, 0, 1]), ["a", "b", "c"])}
    emb = make_evaluator("labels", {"of": "shape"}).embed_samples(ds, np.array([1, 4, 5]))
    np.testing.assert_array_equal(emb, np.eye(3)[[2, 0, 1]])
    with pytest.raises(ConfigError, match="'colour' is not a label of this data"):
        make_evaluator("labels", {"of": "colour"}).embed_samples(ds, np.array([0]))


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="evaluate.clip: modell: unknown key"):
        make_evaluator("clip", {"modell": "x"})
    with pytest.raises(ConfigError, match="evaluate.clip.model: open_clip has no model 'ViT-Nope'"):
        make_evaluator("clip", {"model": "ViT-Nope", "pretrained": None}).embed_images([torch.rand(3, 8, 8)])


@pytest.mark.skipif(host_reachable(HF_HUB), reason="the hub is reachable: this test would download weights")
def test_weights_that_cannot_be_downloaded_fail_in_one_line(tmp_path, capsys):
    for settings, tag in ((["evaluate.clip={pretrained: openai}"], "'openai'"),
                          (["evaluate.clip={evaluator: dinov2, pretrained: true}"], "'pretrained'")):
        code = main(["run", "demo", "--stages", "topk,relevance,embed", "-q", "--set", f"store={tmp_path / 's.h5'}",
                     "data.synthetic.n=60", "topk.k=3", "relevance.n_refs=3", "relevance.planted=null",
                     "relevance.targets=[{layer: logits, attribution_layers: [block_2]}]",
                     "evaluate.references=[clip]", *settings])
        err = capsys.readouterr().err
        assert code == 1
        assert tag in err and "evaluate.clip.pretrained" in err and "local file" in err
        assert err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    path = tmp_path_factory.mktemp("ev") / "ev.h5"
    dataset = random_images(24, 32, seed=11)
    calls = []
    exp = Experiment(model=tiny(seed=5), dataset=dataset, store=path, progress=False,
                     topk={"layers": ["c3"], "k": 8},
                     relevance={"targets": [{"layer": "c3", "neurons": [0, 3, 5, 9],
                                             "attribution_layers": ["c1", "c2"]},
                                            {"layer": "logits", "neurons": "all", "attribution_layers": ["c2"]}],
                                "n_refs": 8},
                     cluster={"spaces": ["c1", "c2", "activation", "clip"],
                              "methods": [{"name": "kmeans", "n_clusters": 2},
                                          {"name": "hdbscan", "min_cluster_size": 3}]},
                     evaluate={"references": ["clip", "dino"], "clip": {"pretrained": None},
                               "dino": SMALL_DINO, "ground_truth": ["class"]})
    from polypure.evaluation.evaluators import ClipEvaluator
    original = ClipEvaluator.embed_images

    def counting(self, images):
        calls.append(len(images))
        return original(self, images)

    ClipEvaluator.embed_images = counting
    try:
        exp.run(["topk", "relevance", "embed", "cluster", "evaluate"])
    finally:
        ClipEvaluator.embed_images = original
    return path, calls


def test_full_view_embeds_each_image_once(evaluated):
    path, calls = evaluated
    with h5py.File(path, "r") as f:
        refs = np.concatenate([f["topk/c3/indices"][[0, 3, 5, 9], :8].ravel(), f["topk/logits/indices"][:, :8].ravel()])
        assert sum(calls) == len(np.unique(refs))
        emb = f["embeddings/clip/c3"]
        assert emb.shape == (4, 8, 768) and emb.dtype == np.float32 and emb.attrs["view"] == "full"
        assert f["embeddings/dino/logits"].shape == (4, 8, 384)
        # rows follow the references: the same image gives the same vector wherever it appears
        c3 = f["topk/c3/indices"][[0, 3, 5, 9], :8]
        first = {}
        for m in range(4):
            for r in range(8):
                first.setdefault(int(c3[m, r]), emb[m, r])
                np.testing.assert_array_equal(emb[m, r], first[int(c3[m, r])])


def test_stored_reference_metrics_equal_independent_computation(evaluated):
    path, _ = evaluated
    with h5py.File(path, "r") as f:
        clip = f["embeddings/clip/c3"][()]
        dino = f["embeddings/dino/c3"][()]
        for space, features in (("c1", f["relevance/c3/c1"][()]), ("activation", f["relevance/c3/activation"][()]),
                                ("dino", dino)):
            stored = f[f"metrics/c3/distance_correlation/clip/{space}"][()]
            np.testing.assert_allclose(stored, [distance_correlation(a, b) for a, b in zip(clip, features)])
        for method in ("kmeans", "hdbscan"):
            labels = f[f"clusters/c3/c2/{method}"][()]
            stored = f[f"metrics/c3/cluster_distances/clip/c2/{method}"][()]
            # a clustering that is all noise or one cluster is a non-result: no distances
            split = f[f"metrics/c3/cluster_status/c2/{method}"].asstr()[()] == ""
            expected = np.array([cluster_distances(a, b) for a, b in zip(clip, labels)])
            np.testing.assert_allclose(stored[split], expected[split])
            assert np.isnan(stored[~split]).all()
        assert f["clusters/c3/c2/hdbscan"].attrs["method"] == "hdbscan"
        assert f["clusters/c3/clip/kmeans"].shape == (4, 8)
        assert "metrics/c3/ari/class/c2/kmeans" in f


def test_summary_has_a_row_per_space_and_is_saved(evaluated):
    path, _ = evaluated
    from polypure.evaluation import summary
    from polypure.store.hdf5_store import Store
    with Store(path, "r") as store:
        records = summary.read(store)
    rows = {(r["space"]) for r in records if r["group"] == "c3" and r["metric"] == "corr clip"}
    assert rows == {"c1", "c2", "activation", "dino"}
    assert path.with_suffix(".metrics.csv").is_file() and path.with_suffix(".metrics.json").is_file()
    text = summary.format_table(records, "kmeans")
    assert "corr clip" in text and "inner clip" in text and "ARI class" in text


def test_the_evaluator_guide_example_works():
    from polypure.evaluation.evaluators import EVALUATORS
    code = doc_page("how-to/evaluator.md").split("```python", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(code, namespace)
    EVALUATORS.register("colour_histogram_test", namespace["ColourHistogram"])
    evaluator = make_evaluator("colour_histogram_test", {"bins": 4})
    red = torch.zeros(3, 10, 10)
    red[0] = 1
    emb = evaluator.embed_images([red, torch.rand(3, 5, 7)])
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb.sum(1), torch.ones(2))
    assert emb[0].argmax() == 3 * 16       # all pixels in the (red=3, green=0, blue=0) bin
