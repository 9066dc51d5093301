"""Bad input ends in one line naming the problem, exit status 2, and a store present before unchanged.

A store is compared byte for byte where the run is refused before it opens the store; where a later stage
fails after others finished (a clusterer that raises, an evaluator of the wrong shape), everything the store
held before must still be there, unchanged (:func:`assert_kept`). Cases that are no error by design (a dead
neuron, HDBSCAN calling everything noise, a broken plugin beside working ones) test the documented behaviour.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from polypure import Experiment
from polypure.cli import main
from polypure.data.datasets import to_rgb
from polypure.evaluation.clustering import CLUSTERERS
from polypure.evaluation.evaluators import EVALUATORS, Evaluator

from .helpers import REPO
from .nets import tiny

SMALL = ["data.synthetic.n=40", "topk.k=5", "topk.layers=[block_3]", "relevance.n_refs=5", "relevance.planted=null",
         "relevance.targets=[{layer: block_3, neurons: '0:3', attribution_layers: [block_2]}]"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished top-K + relevance store of the small config."""
    path = tmp_path_factory.mktemp("made") / "s.h5"
    assert main(["run", "demo", "-q", "--stages", "topk,relevance", "--set", *SMALL, f"store={path}"]) == 0
    return path


def refused(capsys, argv: list[str], *names: str) -> str:
    """Run the command line; it must exit 2 with one line on stderr naming every one of ``names``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for name in names:
        assert name in err[0], (name, err[0])
    return err[0]


@pytest.fixture
def store(made, tmp_path):
    """A copy of the finished store, with its bytes to compare after a refused run."""
    path = tmp_path / "s.h5"
    shutil.copy(made, path)
    return path, path.read_bytes()


CONFIG_CASES = {
    "unknown key": (["relevance.n_ref=4"], ["relevance.n_ref", "did you mean 'n_refs'"]),
    "wrong type": (["topk.k=many"], ["topk.k"]),
    "missing file": (["model.weights=/no/such/weights.safetensors"], ["/no/such/weights.safetensors"]),
    "layer alias naming a missing module": (["model.layers={block_3: layer9}"], ["layer9"]),
    "target below an attribution layer": (
        ["relevance.targets=[{layer: block_1, neurons: '0:2', attribution_layers: [block_2]}]"], ["block_2", "block_1"]),
    "the same target twice": (["relevance.targets=[{layer: block_3, neurons: [0], attribution_layers: [block_2]}, "
                               "{layer: block_3, neurons: [1], attribution_layers: [block_1]}]"], ["twice"]),
    "neuron out of range": (["relevance.targets=[{layer: block_3, neurons: [999], attribution_layers: [block_2]}]"],
                            ["999"]),
    "n_refs above k": (["relevance.n_refs=9"], ["relevance.n_refs", "topk.k"]),
    "k above the samples": (["topk.k=50", "relevance.n_refs=5", "data.synthetic.n=40"], ["topk.k", "40"]),
    "cuda without CUDA": (["device=cuda"], ["device", "cuda"]),
    "variant with an unknown composite": (["relevance.variants=[{id: x, composite: epsilon_plux}]"],
                                          ["epsilon_plux"]),
    "store made by another config": (["data.synthetic.seed=7"], ["data.synthetic.seed", "--overwrite"]),
    "unknown evaluator setting": (["evaluate.references=[labels]", "evaluate.labels={oof: shape}"],
                                  ["evaluate.labels", "oof: unknown key", "did you mean 'of'"]),
    "unknown synthetic-data setting": (["data.synthetic.seeed=3"],
                                       ["data.synthetic", "seeed: unknown key", "did you mean 'seed'"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_mistakes_are_one_line_and_keep_the_store(case, store, capsys):
    if case == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path, before = store
    overrides, names = CONFIG_CASES[case]
    refused(capsys, ["run", "demo", "-q", "--stages", "topk,relevance", "--set", *SMALL, *overrides,
                     f"store={path}"], *names)
    assert path.read_bytes() == before


def test_a_store_of_a_newer_format_and_a_truncated_store_are_refused(store, tmp_path, capsys):
    path, _ = store
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    newer = path.read_bytes()
    refused(capsys, ["relevance", "demo", "--set", *SMALL, f"store={path}"], str(path), "format version 99")
    assert path.read_bytes() == newer
    truncated = tmp_path / "t.h5"
    truncated.write_bytes(newer[:2000])
    refused(capsys, ["relevance", "demo", "--set", *SMALL, f"store={truncated}"], str(truncated))
    assert truncated.read_bytes() == newer[:2000]
    refused(capsys, ["inspect", str(truncated)], str(truncated))


def images_config(root: Path, image_size="64") -> list[str]:
    return ["data.kind=images", f"data.root={root}", f"data.image_size={image_size}", "data.num_workers=0",
            "data.synthetic={}", "topk.k=2", "relevance.n_refs=2", "topk.layers=[block_3]", "relevance.planted=null",
            "relevance.targets=[{layer: block_3, neurons: [0], attribution_layers: [block_2]}]",
            "evaluate.ground_truth=[]"]


def write_images(root: Path, n: int = 4, size=(64, 64)) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"{i}.jpg")


def test_an_empty_image_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    refused(capsys, ["topk", "demo", "--set", *images_config(tmp_path / "empty"), f"store={tmp_path / 's.h5'}"],
            str(tmp_path / "empty"))


def test_a_corrupt_or_truncated_jpeg_among_good_ones_is_refused_by_name(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_images(root)
    good = (root / "1.jpg").read_bytes()
    (root / "1.jpg").write_bytes(good[:len(good) // 3])  # truncated
    (root / "2.jpg").write_bytes(b"not a jpeg at all")  # corrupt
    line = refused(capsys, ["topk", "demo", "-q", "--set", *images_config(root), f"store={tmp_path / 's.h5'}"],
                   "sample")
    assert "1.jpg" in line or "2.jpg" in line


def test_images_of_mixed_sizes_at_native_size(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_images(root, 3)
    write_images(tmp_path / "other", 1, size=(48, 40))
    shutil.move(tmp_path / "other" / "0.jpg", root / "9.jpg")
    refused(capsys, ["topk", "demo", "-q", "--set", *images_config(root, "null"), f"store={tmp_path / 's.h5'}"],
            "data.image_size", "differ in size")


def test_greyscale_cmyk_16_bit_and_rgba_images_are_read_as_rgb(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    images = {
        "L": Image.fromarray(grey),
        "CMYK": Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("CMYK"),
        "I;16": Image.fromarray(grey.astype(np.uint16) * 257),
        "RGBA": Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA"),
    }
    assert images["I;16"].mode.startswith("I;16")
    for mode, image in images.items():
        rgb = to_rgb(image)
        assert rgb.shape == (3, 32, 32) and rgb.dtype == torch.float32 and 0 <= rgb.min() and rgb.max() <= 1, mode
    # 16-bit pixels are scaled, not clipped to white: the same picture as its 8-bit version
    np.testing.assert_allclose(to_rgb(images["I;16"])[0].numpy(), grey / 255, atol=1e-6)
    root = tmp_path / "modes"
    root.mkdir()
    for i, (mode, image) in enumerate(images.items()):
        image.resize((64, 64)).save(root / f"{i}.{'tif' if mode in ('CMYK', 'I;16') else 'png'}")
    assert main(["topk", "demo", "-q", "--set", *images_config(root), f"store={tmp_path / 's.h5'}"]) == 0


def test_an_npz_without_the_named_array(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", pictures=np.zeros((4, 8, 8, 3), np.uint8))
    refused(capsys, ["topk", "demo", "--set", "data.kind=npz", f"data.path={tmp_path / 'd.npz'}",
                     f"store={tmp_path / 's.h5'}"], "data.images_key", "pictures")


def test_weights_that_do_not_fit_or_are_no_state_dict(tmp_path, capsys):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 3, 3, 3)}, str(other))
    refused(capsys, ["topk", "demo", "--set", *SMALL, f"model.weights={other}", f"store={tmp_path / 'a.h5'}"],
            str(other), "do not fit", "missing")
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    refused(capsys, ["topk", "demo", "--set", *SMALL, f"model.weights={listed}", f"store={tmp_path / 'b.h5'}"],
            str(listed), "state dict")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": _Payload(str(marker))}, evil)
    refused(capsys, ["topk", "demo", "--set", *SMALL, f"model.weights={evil}", f"store={tmp_path / 's.h5'}"],
            str(evil))
    assert not marker.exists()


def test_a_model_factory_that_raises(tmp_path, capsys):
    factory = tmp_path / "broken_model.py"
    factory.write_text("def build(**kwargs):\n    raise RuntimeError('no GPU driver in this image')\n")
    refused(capsys, ["topk", "demo", "--set", *SMALL, f"model.name=python:{factory}:build",
                     f"store={tmp_path / 's.h5'}"], "model.name", "no GPU driver")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_activations_name_the_layer_and_sample(tmp_path, value):
    from polypure.errors import ConfigError

    model = tiny(seed=1)
    with torch.no_grad():
        model.module.conv3.bias[2] = value
    images = torch.utils.data.TensorDataset(torch.rand(6, 3, 16, 16), torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ConfigError, match=r"layer 'c3': (nan|inf) activation at sample 0, channel 2"):
        Experiment(model=model, dataset=images, store=tmp_path / "s.h5", progress=False,
                   topk={"layers": ["c3"], "k": 2},
                   relevance={"targets": [{"layer": "c3", "neurons": [0], "attribution_layers": ["c2"]}],
                              "n_refs": 2}).topk()


@pytest.mark.slow
def test_the_report_shows_html_in_sample_ids_and_class_names_as_text(tmp_path):
    evil_class, evil_file = "<img src=x onerror=alert(1)>", "<b>bold"
    rng = np.random.default_rng(2)
    for label in (evil_class, "plain"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                tmp_path / "data" / label / f"{evil_file}{i}.png")
    overrides = [*images_config(tmp_path / "data"), "data.kind=imagefolder", "topk.k=4", "relevance.n_refs=4",
                 "report.neurons=1", "cluster.methods=[{name: kmeans, n_clusters: 2}]", "evaluate.ground_truth=[class]",
                 f"store={tmp_path / 's.h5'}", f"report.out={tmp_path / 'report'}"]
    assert main(["run", "demo", "-q", "--set", *overrides]) == 0
    pages = "".join(p.read_text() for p in (tmp_path / "report").rglob("*.html"))
    assert "&lt;img src=x onerror=alert(1)&gt;" in pages or "&lt;b&gt;bold" in pages
    assert evil_class not in pages and evil_file not in pages


# ---------------------------------------------------------------------------------------------------
# later stages: clusterers, evaluators, plugins


def contents(path: Path) -> dict:
    """Every dataset's values and every object's attributes, but the root ``config`` (each run records its own)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            attrs = {key: np.asarray(value).tolist() for key, value in obj.attrs.items()
                     if not (name == "/" and key == "config")}
            # repr: a NaN metric equals itself
            out[name] = repr((obj[()].tolist() if isinstance(obj, h5py.Dataset) else None, attrs))
        visit("/", f)
        f.visititems(visit)
    return out


def assert_kept(before: dict, path: Path) -> None:
    """Everything a store held before a failed run is still there, unchanged."""
    after = contents(path)
    for name, value in before.items():
        assert after.get(name) == value, name


def kill_channel(path: Path, channel: int) -> Path:
    """The demo weights with one block_3 channel that never fires (a dead neuron), as a .safetensors file."""
    from safetensors.torch import save_file

    from polypure.models.demo_resnet import WEIGHTS
    from polypure.models.factory import load_state_dict_file

    state = load_state_dict_file(WEIGHTS)
    state["layer4.0.bn2.weight"][channel] = 0.0
    state["layer4.0.bn2.bias"][channel] = -1e4  # below anything the shortcut adds: relu gives 0 everywhere
    save_file(state, str(path))
    return path


#: The labels evaluator as a reference space: reference metrics and purity scores without downloading CLIP.
LABELS = ["evaluate.references=[labels]", "evaluate.labels={of: shape}", "evaluate.ground_truth=[shape]"]


def scored_only_where_defined(store_path: Path) -> list[dict]:
    """The summary saved beside a store; a mean is a number exactly where some neuron was scored (no NaN poison)."""
    import json

    records = json.loads(store_path.with_suffix(".metrics.json").read_text())
    assert records
    for record in records:
        mean = record["mean"]
        assert (mean is not None and np.isfinite(mean)) == (record["n"] > 0), record
    return records


def warnings_of(caplog) -> list[str]:
    """The warnings logged under ``polypure`` (the command line prints them as ``polypure: ...`` lines)."""
    return [r.getMessage() for r in caplog.records if r.name == "polypure" and r.levelno == logging.WARNING]


@pytest.mark.slow
def test_a_dead_neuron_is_stored_flagged_and_not_clustered(tmp_path, caplog):
    weights = kill_channel(tmp_path / "dead.safetensors", channel=1)
    path = tmp_path / "s.h5"
    assert main(["run", "demo", "-q", "--set", *SMALL, *LABELS, f"model.weights={weights}", f"store={path}",
                 "report.neurons=3", f"report.out={tmp_path / 'report'}"]) == 0
    told = [line for line in warnings_of(caplog) if "dead" in line]
    # one warning for the run: per target and method, with the count, not one per neuron
    assert told == ["cluster block_3: kmeans: 1 of 6 (neuron, space) pairs have all-zero features (dead neurons): not "
                    "clustered, labelled -1, no score (counted as 'constant' in the summary)"], warnings_of(caplog)
    with h5py.File(path, "r") as f:
        assert not f["relevance/block_3/block_2"][1].any() and f["relevance/block_3/block_2"][0].any()  # stored
        assert f["metrics/block_3/degenerate/block_2"].asstr()[1] == "constant"  # flagged
        clusters = f["clusters/block_3/block_2/kmeans"]
        assert clusters[1].tolist() == [-1] * 5 and clusters[0].min() >= 0  # not clustered; the others are
        assert clusters.attrs["not_clustered"].tolist() == [1]
        assert f["metrics/block_3/cluster_status/block_2/kmeans"].asstr()[1] == "all-noise"
        for name in ("ari/shape/block_2/kmeans", "split_gain/labels/block_2/kmeans",
                     "cluster_distances/labels/block_2/kmeans"):
            assert np.isnan(f[f"metrics/block_3/{name}"][1]).all(), name  # a non-result, not a zero
    records = scored_only_where_defined(path)
    dead_space = [r for r in records if r["space"] == "block_2" and r["method"] == "kmeans"]
    assert dead_space and all(r["n"] <= 2 and "1 constant" in r["skipped"] for r in dead_space)
    # the report says what was left out of its means, and draws the dead neuron's page (clusters all -1) too
    index = re.sub(r"<[^>]+>", " ", (tmp_path / "report" / "index.html").read_text())
    assert re.search(r"Not scored .*block_2: 1 constant", index)
    assert "noise: 5 refs" in re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", (
        tmp_path / "report" / "neurons" / "block_3" / "1.html").read_text()))


def test_hdbscan_labelling_everything_noise_is_stored_and_told(store, caplog):
    path, _ = store
    assert main(["run", "demo", "-q", "--stages", "embed,cluster,evaluate", "--set", *SMALL, *LABELS,
                 "cluster.methods=[{name: hdbscan, min_cluster_size: 5}]", f"store={path}"]) == 0
    assert [w for w in warnings_of(caplog) if "noise" in w] == [
        "cluster block_3: hdbscan: 6 of 6 (neuron, space) pairs have every reference labelled noise: stored as they "
        "are, no score (counted as 'all-noise' in the summary)"]
    with h5py.File(path, "r") as f:
        assert (f["clusters/block_3/block_2/hdbscan"][()] == -1).all()
        assert set(f["metrics/block_3/cluster_status/block_2/hdbscan"].asstr()[()]) == {"all-noise"}
    records = scored_only_where_defined(path)
    assert all("all-noise" in r["skipped"] for r in records if r["method"] == "hdbscan")


def test_kmeans_asked_for_more_clusters_than_references(store, capsys):
    path, before = store
    refused(capsys, ["run", "demo", "-q", "--stages", "cluster", "--set", *SMALL, f"store={path}",
                     "cluster.methods=[{name: kmeans}, {name: kmeans, id: k9, n_clusters: 9}]"],
            "cluster.methods (k9)", "n_clusters (9)", "relevance.n_refs = 5")
    assert path.read_bytes() == before  # refused before the store was opened: not even the first method ran


class _Boom:
    """A clusterer plugin that fails on the data."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit_predict(self, x):
        raise ValueError("boom: cannot split these\nsecond line")


def test_a_clusterer_that_raises_keeps_the_clusterings_before_it(store, capsys, monkeypatch):
    monkeypatch.setitem(CLUSTERERS._entries, "boom", _Boom)
    path, _ = store
    before = contents(path)
    refused(capsys, ["run", "demo", "-q", "--stages", "cluster", "--set", *SMALL, f"store={path}",
                     "cluster.methods=[{name: kmeans}, {name: boom}]"],
            "cluster.methods (boom)", "target 'block_3'", "space 'block_2'", "ValueError", "boom: cannot split these")
    assert_kept(before, path)
    with h5py.File(path, "r") as f:
        assert f["clusters/block_3/block_2/kmeans"].shape == (3, 5)  # finished before the failure: committed
        assert "boom" not in f["clusters/block_3/block_2"]


class _Flat(Evaluator):
    """An evaluator plugin that returns one number per image instead of a vector."""

    def embed_images(self, images):
        return torch.zeros(len(images))


class _Nothing(Evaluator):
    """An evaluator plugin that returns no array at all."""

    def embed_images(self, images):
        return None


@pytest.mark.parametrize("plugin,said", [(_Flat, r"returned an array of shape \(\d+,\) for \d+ samples"),
                                         (_Nothing, r"returned list for \d+ samples .* not an array of numbers")])
def test_an_evaluator_of_the_wrong_shape_is_refused(store, capsys, monkeypatch, plugin, said):
    monkeypatch.setitem(EVALUATORS._entries, "flat", plugin)
    path, _ = store
    before = contents(path)
    line = refused(capsys, ["run", "demo", "-q", "--stages", "embed", "--set", *SMALL, "evaluate.references=[flat]",
                            f"store={path}"], "evaluate.flat", "target 'block_3'", "it must return (")
    assert re.search(said, line), line
    assert_kept(before, path)
    with h5py.File(path, "r") as f:
        assert "embeddings" not in f


@pytest.fixture
def broken_plugin(monkeypatch):
    """A clusterer entry point whose module does not import, beside the built-ins."""
    from importlib.metadata import EntryPoint

    from polypure import registry

    broken = EntryPoint("gmm_broken", "polypure_no_such_module:Gmm", "polypure.clusterers")
    monkeypatch.setattr(registry, "entry_points", lambda group: [broken] if group == CLUSTERERS.group else [])
    monkeypatch.setattr(CLUSTERERS, "_entries", dict(CLUSTERERS._entries))
    monkeypatch.setattr(CLUSTERERS, "_plugins_loaded", False)


def test_a_broken_entry_point_is_listed_and_the_rest_works(broken_plugin, store, capsys):
    assert main(["list", "clusterers"]) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(r"clusterers: dominant, gmm_broken \(broken\), hdbscan, kmeans\n", out), out
    assert err == ("polypure: warning: clusterer plugin 'gmm_broken' (polypure_no_such_module:Gmm) failed to load: "
                   "ModuleNotFoundError: No module named 'polypure_no_such_module'\n")
    # a MODULE:CLASS name loads the plugins too: the broken one must not take the run down
    path, _ = store
    assert main(["run", "demo", "-q", "--stages", "cluster", "--set", *SMALL, f"store={path}",
                 "cluster.methods=[{name: kmeans}, {name: 'sklearn.cluster:AgglomerativeClustering', id: agglo}]"]) == 0
    with h5py.File(path, "r") as f:
        assert {"kmeans", "agglo"} <= set(f["clusters/block_3/block_2"])
    capsys.readouterr()
    refused(capsys, ["run", "demo", "-q", "--stages", "cluster", "--set", *SMALL, f"store={path}",
                     "cluster.methods=[{name: gmm_broken}]"], "cluster.methods[0] (gmm_broken)", "failed to load")


def test_bad_input_errors_exit_2_and_other_errors_exit_1():
    from polypure.errors import ConfigError, InputError, PolypureError, StoreError

    assert issubclass(ConfigError, InputError) and issubclass(StoreError, InputError)
    for error, status in ((InputError, 2), (ConfigError, 2), (StoreError, 2), (PolypureError, 1)):
        def fail(*args, error=error, **kwargs):
            raise error("x")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("polypure.store.inspection.describe", fail)
            assert main(["inspect", "whatever.h5"]) == status, error


# ---------------------------------------------------------------------------------------------------
# where the store goes


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder unwritable: by its mode, or, for root (whom modes do not stop), as the kernel would refuse.

    Running as root, ``chmod`` does not stop writes and a read-only bind mount cannot be made here, so the
    refusal is simulated at the system-call level: ``os.open`` fails with EACCES for anything that would
    create or write a file in the folder, as it does for any other user. What is tested (that the run asks
    the operating system, not ``os.access``, and gives up in one line before any work) is the same.
    """
    folders = []

    def make(folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder)
        if os.geteuid() == 0:
            real_open = os.open
            writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

            def refusing_open(file, flags, *args, **kwargs):
                target = Path(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else None
                if target is not None and flags & writing and folder in (target, *target.parents):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
                return real_open(file, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", refusing_open)
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)  # so that pytest can remove it


def no_work(monkeypatch) -> None:
    """Fail the test if the model is built: a refused run must stop before any work."""
    import polypure.experiment

    def build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(polypure.experiment, "build_model", build)


def test_a_new_store_in_a_read_only_folder(tmp_path, capsys, read_only, monkeypatch):
    folder = read_only(tmp_path / "ro")
    no_work(monkeypatch)
    path = folder / "runs" / "s.h5"
    refused(capsys, ["run", "demo", "-q", "--set", *SMALL, f"store={path}"], f"store {str(path)!r} cannot be written",
            f"folder {str(folder)!r} is not writable", "set another store path")
    assert list(folder.iterdir()) == []


def test_an_existing_store_in_a_read_only_folder(made, tmp_path, capsys, read_only, monkeypatch):
    # the store file itself could be replaced, but its lock and working copy are new files in the folder
    (tmp_path / "ro").mkdir()
    path = tmp_path / "ro" / "s.h5"
    shutil.copy(made, path)
    before = path.read_bytes()
    folder = read_only(tmp_path / "ro")
    no_work(monkeypatch)
    refused(capsys, ["run", "demo", "-q", "--stages", "topk,relevance,cluster", "--set", *SMALL, f"store={path}"],
            f"store {str(path)!r} cannot be written", f"folder {str(folder)!r} is not writable")
    assert path.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["s.h5"]


def test_overwrite_never_deletes_a_store_of_a_newer_format(store, capsys):
    path, _ = store
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    newer = path.read_bytes()
    # a config that differs in the model, data or seed is what --overwrite replaces a store for
    for changed in ([], ["data.synthetic.seed=7"]):
        refused(capsys, ["run", "demo", "-q", "--stages", "topk,relevance", "--overwrite", "--set", *SMALL, *changed,
                         f"store={path}"], str(path), "format version 99", "upgrade polypure")
        assert path.read_bytes() == newer


# ---------------------------------------------------------------------------------------------------
# security


def test_yaml_is_only_read_with_safe_load(tmp_path, capsys):
    unsafe = re.compile(r"yaml\.(load|unsafe_load|full_load|load_all|unsafe_load_all|full_load_all)\(|Loader\s*=")
    for path in (REPO / "src" / "polypure").rglob("*.py"):
        assert not unsafe.search(path.read_text()), path
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
                      f"['{marker}']]\nstore: {tmp_path / 's.h5'}\n")
    refused(capsys, ["run", str(config), "-q"], str(config), "not valid YAML")
    assert not marker.exists()


@pytest.mark.slow
def test_a_python_spec_in_a_stored_config_is_never_run(store, tmp_path, capsys):
    path, _ = store
    # metrics, so that export and compare have something to read
    assert main(["run", "demo", "-q", "--stages", "cluster,evaluate", "--set", *SMALL, f"store={path}"]) == 0
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n\ndef build(**kwargs):\n    pass\n")
    with h5py.File(path, "a") as f:
        config = yaml.safe_load(f.attrs["config"])
        config["model"]["name"] = f"python:{evil}:build"
        config["data"] = {"kind": f"python:{evil}:build", "kwargs": {}}
        f.attrs["config"] = yaml.safe_dump(config)
    copy = tmp_path / "copy.h5"
    shutil.copy(path, copy)
    for argv in (["inspect", str(path)], ["export", str(path), str(tmp_path / "tables")],
                 ["report", str(path), "-q", "--neurons", "1", "--out", str(tmp_path / "report")],
                 ["compare", str(path), str(copy), "--out", str(tmp_path / "compared")]):
        code = main(argv)
        assert code == 0, (argv, capsys.readouterr().err)
        assert not marker.exists(), argv
    # the report says why it has no thumbnails instead of running the factory
    assert "which a report does not run" in (tmp_path / "report" / "index.html").read_text()


# ---------------------------------------------------------------------------------------------------
# paths of the wrong kind: every path a user gives is checked for its kind before any work


@pytest.fixture
def no_hang():
    """Fail instead of waiting forever where a FIFO would be opened for reading (its kind not checked first)."""
    def alarm(signum, frame):
        raise TimeoutError("a FIFO was opened: the path's kind was not checked before it was read")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


#: What each wrong kind is called in a refusal.
FOUND = {"folder": "found a folder", "file": "found a regular file", "fifo": "found a special file (FIFO)",
         "device": "found a special file (character device)"}


def wrong_kind(folder: Path, kind: str, name: str) -> Path:
    """A path named ``name`` in ``folder`` that is a folder, a regular file, a FIFO or a character device.

    The device is a link to ``/dev/null`` under the name given (so that it can end in ``.py``): the kind is
    that of what a link points to, and a run that failed to refuse it would replace the link, never
    ``/dev/null``.
    """
    path = folder / name
    if kind == "folder":
        path.mkdir()
    elif kind == "file":
        path.write_text("a regular file\n")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(os.devnull)
    return path


def state(path: Path) -> tuple:
    """What a path is and holds, to tell that a refused command left it alone."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_dir():
        return ("folder", sorted(p.name for p in path.iterdir()))
    if path.is_fifo():
        return ("fifo",)
    return ("file", path.read_bytes())


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _small_run(command: str, tmp: Path, *overrides: str) -> list[str]:
    return [command, "demo", "-q", "--set", *SMALL, f"store={tmp / 'out' / 's.h5'}", *overrides]


#: Entry points that take a regular file: (name the path gets, argv for it). ``tmp`` is a folder of the test.
FILE_ENTRIES = {
    "config file of run": ("c.yaml", lambda p, tmp, made: ["run", str(p), "-q"]),
    "config file of check-rules": ("c.yaml", lambda p, tmp, made: ["check-rules", str(p), "-q"]),
    "store of a run (--set store)": ("s.h5", lambda p, tmp, made: ["topk", "demo", "-q", "--set", *SMALL,
                                                                   f"store={p}"]),
    "model.weights": ("w.safetensors", lambda p, tmp, made: _small_run("topk", tmp, f"model.weights={p}")),
    "model.name python: file": ("m.py", lambda p, tmp, made: _small_run("topk", tmp, f"model.name=python:{p}:build")),
    "crp-fashion model file": ("m.py", lambda p, tmp, made: [
        "topk", str(REPO / "configs" / "crp_fashion.yaml"), "-q", "--set", f"model.name=python:{p}:fashion_cnn",
        f"store={tmp / 'out' / 's.h5'}"]),
    "data.kind python: file": ("d.py", lambda p, tmp, made: _small_run("topk", tmp, f"data.kind=python:{p}:build")),
    "data.path of npz": ("d.npz", lambda p, tmp, made: _small_run("topk", tmp, "data.kind=npz", f"data.path={p}")),
    "data.classes": ("classes.txt", lambda p, tmp, made: _small_run(
        "topk", tmp, *images_config(tmp / "imgs"), "data.labels=prefix", f"data.classes={p}")),
    "evaluate.dinov2.pretrained": ("v.safetensors", lambda p, tmp, made: _small_run(
        "run", tmp, "evaluate.references=[dinov2]", f"evaluate.dinov2={{pretrained: {p}}}")),
    "store of inspect": ("s.h5", lambda p, tmp, made: ["inspect", str(p)]),
    "store of report": ("s.h5", lambda p, tmp, made: ["report", str(p), "-q", "--out", str(tmp / "out" / "r")]),
    "store of export": ("s.h5", lambda p, tmp, made: ["export", str(p), str(tmp / "out" / "t")]),
    "store of compare": ("s.h5", lambda p, tmp, made: ["compare", str(made), str(p), "--out", str(tmp / "out" / "c")]),
}

#: Entry points that take a folder (existing for inputs, existing or new for outputs).
FOLDER_ENTRIES = {
    "data.root of imagefolder": ("imgs", lambda p, tmp, made: _small_run(
        "topk", tmp, "data.kind=imagefolder", f"data.root={p}")),
    "data.root of images": ("imgs", lambda p, tmp, made: _small_run("topk", tmp, "data.kind=images", f"data.root={p}")),
    "report.out": ("r", lambda p, tmp, made: _small_run("run", tmp, "report.neurons=1", f"report.out={p}")),
    "report --out": ("r", lambda p, tmp, made: ["report", str(made), "-q", "--out", str(p)]),
    "export DIR": ("t", lambda p, tmp, made: ["export", str(made), str(p)]),
    "compare --out": ("c", lambda p, tmp, made: ["compare", str(made), str(made), "--out", str(p)]),
    "demo-train --out": ("w", lambda p, tmp, made: ["demo-train", "--out", str(p), "-q"]),
    "folder of a new store": ("f", lambda p, tmp, made: ["topk", "demo", "-q", "--set", *SMALL,
                                                         f"store={p / 'runs' / 's.h5'}"]),
}


def _kind_case(entries, kinds):
    return [pytest.param(entry, kind, id=f"{entry} <- {kind}") for entry in entries for kind in kinds]


def _refused_for_its_kind(capsys, tmp_path, made, entry, kind, expected):
    (tmp_path / "out").mkdir()
    write_images(tmp_path / "imgs", 2)
    name, argv = entry
    path = wrong_kind(tmp_path / "out", kind, name)
    before, files = state(path), tree(tmp_path)
    line = refused(capsys, argv(path, tmp_path, made), str(path), FOUND[kind])
    # the path's kind is said, whichever folder is the one of the wrong kind (the path, or one above it)
    assert f"expected {expected}" in line or "expected a folder at" in line, line
    assert state(path) == before, "the refused path was changed"
    assert tree(tmp_path) == files, "a refused command wrote something"
    return line


@pytest.mark.parametrize("entry,kind", _kind_case(FILE_ENTRIES, ("folder", "fifo", "device")))
def test_a_file_path_of_another_kind_is_refused_by_name_before_any_work(entry, kind, tmp_path, made, capsys,
                                                                        monkeypatch, no_hang):
    if entry not in ("store of report", "store of export", "store of compare", "store of inspect"):
        no_work(monkeypatch)
    line = _refused_for_its_kind(capsys, tmp_path, made, FILE_ENTRIES[entry], kind, "a file")
    assert "expected a file" in line


@pytest.mark.parametrize("entry,kind", _kind_case(FOLDER_ENTRIES, ("file", "fifo", "device")))
def test_a_folder_path_of_another_kind_is_refused_by_name_before_any_work(entry, kind, tmp_path, made, capsys,
                                                                          monkeypatch, no_hang):
    if entry not in ("report.out", "report --out", "export DIR", "compare --out"):
        no_work(monkeypatch)  # the report's folder is checked with the model's layers, still before any stage
    _refused_for_its_kind(capsys, tmp_path, made, FOLDER_ENTRIES[entry], kind, "a folder")


@pytest.mark.parametrize("argv", [["run", os.devnull, "-q"], ["inspect", os.devnull],
                                  ["export", os.devnull, "unused"]], ids=["config", "inspect", "export"])
def test_dev_null_itself_is_refused_as_a_special_file(argv, capsys):
    refused(capsys, argv, f"{os.devnull!r}: expected a file, found a special file (character device)")


def test_a_bundled_config_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    from polypure.config.settings import load_config

    assert load_config("demo").name == "demo"
    refused(capsys, ["run", "demo/", "-q"], "config file 'demo': expected a file, found a folder")


def test_path_kinds_are_told_by_the_one_helper(tmp_path):
    from polypure.config.paths import kind_of, require_file, require_folder, require_output_file, require_output_folder
    from polypure.errors import ConfigError, StoreError

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    (tmp_path / "f").write_text("x")
    assert [kind_of(tmp_path / n) for n in ("pipe", "link", "f", "missing")] == [
        "a special file (FIFO)", "a broken symbolic link", "a regular file", None]
    assert kind_of(tmp_path) == "a folder" and kind_of(os.devnull) == "a special file (character device)"
    assert require_output_file(tmp_path / "new" / "s.h5", "store") == tmp_path / "new" / "s.h5"
    assert require_output_folder(tmp_path / "new", "--out") == tmp_path / "new"
    with pytest.raises(StoreError, match=r"store '.*/f/s.h5': expected a folder at '.*/f', found a regular file"):
        require_output_file(tmp_path / "f" / "s.h5", "store", StoreError)
    with pytest.raises(ConfigError, match=r"found a broken symbolic link"):
        require_file(tmp_path / "link", "config file")
    with pytest.raises(ConfigError, match=r"data.root: folder '.*/missing' does not exist"):
        require_folder(tmp_path / "missing", "data.root: folder")
    assert not (tmp_path / "new").exists()  # checking creates nothing


# ---------------------------------------------------------------------------------------------------
# selections: never empty, never past what exists, never clipped


def _target(neurons) -> str:
    return f"relevance.targets=[{{layer: block_3, neurons: {json.dumps(neurons)}, attribution_layers: [block_2]}}]"


SHORT_FORM = ["relevance.targets=null", "relevance.target_layer=block_3", "relevance.attribution_layers=[block_2]"]
RANGE_128 = "0 <= start < stop <= 128"

#: Selections of block_3 (128 channels) in every notation: (overrides, words the one line must hold).
NEURON_SELECTIONS = {
    "range, empty": ("5:5", ["'5:5'", "selects no neuron", "start < stop"]),
    "range, reversed": ("9:3", ["'9:3'", "selects no neuron", "start < stop"]),
    "range, start past the end": ("200:", ["'200:'", "selects no neuron", RANGE_128]),
    "range, stop past the end": ("0:400", ["'0:400'", "reaches past the last channel", RANGE_128, "not clipped"]),
    "range, partly past the end": ("120:140", ["'120:140'", "reaches past the last channel", RANGE_128]),
    "range, negative start": ("-3:", ["'-3:'", "negative", "0 <= start < stop"]),
    "range, negative stop": (":-1", ["':-1'", "negative", "0 <= start < stop"]),
    "range, negative past the start": ("-400:", ["'-400:'", "negative", "0 <= start < stop"]),
    "list, empty": ([], ["an empty list selects no neuron"]),
    "list, past the end": ([5, 500], ["neuron 500 out of range", "128 channels", "ids 0..127"]),
    "list, negative": ([3, -1], ["neuron -1 is negative", "start at 0"]),
    "list, repeated": ([3, 3], ["neuron 3 is listed twice"]),
    "one id, past the end": (128, ["neuron 128 out of range", "ids 0..127"]),
    "one id, negative": (-1, ["neuron -1 is negative"]),
    "not an id": (True, ["True", "'start:stop'"]),
}


@pytest.mark.parametrize("form", sorted(NEURON_SELECTIONS))
@pytest.mark.parametrize("where", ["relevance.targets[0].neurons", "relevance.neurons"])
def test_every_neuron_selection_is_non_empty_and_within_its_layer(form, where, tmp_path, capsys):
    value, words = NEURON_SELECTIONS[form]
    if where == "relevance.neurons":
        overrides = [*SHORT_FORM, f"relevance.neurons={json.dumps(value)}"]
    else:
        overrides = [_target(value)]
    refused(capsys, _small_run("topk", tmp_path, *overrides), where, *words)
    assert not (tmp_path / "out").exists()


#: Counts and lists of the config: (overrides, key, words). 40 samples, k = n_refs = 5, target block_3 '0:3'.
CONFIG_SELECTIONS = {
    "planted pairs, none": (["relevance.planted={pairs: 0}"], "relevance.planted.pairs", ["(got 0)", "greater than or equal to 1"]),
    "planted pairs, negative": (["relevance.planted={pairs: -1}"], "relevance.planted.pairs", ["(got -1)"]),
    "planted pairs, past the channels": (["relevance.planted={pairs: 65}"], "relevance.planted.pairs",
                                         ["65 is more than the 64 disjoint pairs", "128 channels", "valid: 1..64"]),
    "planted modes, none": (["relevance.planted={mode: []}"], "relevance.planted.mode", ["empty list", "no mode"]),
    "planted entries, none": (["relevance.planted=[]"], "relevance.planted", ["empty list"]),
    "report.neurons, none": (["report.neurons=0"], "report.neurons", ["(got 0)", "greater than or equal to 1"]),
    "report.neurons, negative": (["report.neurons=-1"], "report.neurons", ["(got -1)"]),
    "topk.k, none": (["topk.k=0"], "topk.k", ["(got 0)", "greater than or equal to 1"]),
    "topk.k, negative": (["topk.k=-1"], "topk.k", ["(got -1)"]),
    "topk.k, past the samples": (["topk.k=41"], "topk.k", ["41 is more than the 40 samples", "valid: 1..40"]),
    "n_refs, none": (["relevance.n_refs=0"], "relevance.n_refs", ["(got 0)"]),
    "n_refs, negative": (["relevance.n_refs=-1"], "relevance.n_refs", ["(got -1)"]),
    "n_refs, past k": (["relevance.n_refs=6"], "relevance.n_refs", ["(6) must be at most topk.k (5)"]),
    "data.limit, none": (["data.limit=0"], "data.limit", ["(got 0)"]),
    "data.limit, negative": (["data.limit=-1"], "data.limit", ["(got -1)"]),
    "data.limit, past the samples": (["data.limit=41"], "data.limit",
                                     ["41 is more than the 40 samples", "valid: 1..40"]),
    "attribution layers (short form), empty": ([*SHORT_FORM, "relevance.attribution_layers=[]"],
                                               "relevance.attribution_layers", ["empty list", "attribution layer"]),
    "attribution layers of a target, empty": (
        ["relevance.targets=[{layer: block_3, neurons: '0:3', attribution_layers: []}]"],
        "relevance.targets[0].attribution_layers", ["empty list", "attribution layer"]),
    "attribution layers of planted neurons, empty": (["relevance.planted={attribution_layers: []}"],
                                                     "relevance.planted.attribution_layers", ["empty list"]),
    "targets, empty without planted ones": (["relevance.targets=[]"], "relevance.targets",
                                            ["empty list", "no neuron to explain"]),
    "cluster spaces, empty": (["cluster.spaces=[]"], "cluster.spaces", ["empty list", "no space"]),
    "cluster methods, empty": (["cluster.methods=[]"], "cluster.methods", ["empty list", "no clusterer"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_SELECTIONS))
def test_every_count_and_list_of_the_config_is_non_empty_and_within_range(case, tmp_path, capsys):
    overrides, key, words = CONFIG_SELECTIONS[case]
    refused(capsys, _small_run("run", tmp_path, *overrides), key, *words)
    assert not (tmp_path / "out").exists()


def test_report_neurons_of_a_config_is_a_cap_that_narrower_runs_keep(tmp_path):
    # the demo config asks for 12 pages per target; a run narrowed to 3 neurons gets a page for each of them
    assert main(_small_run("run", tmp_path, "report.neurons=12", "cluster.methods=[{name: kmeans, n_clusters: 2}]",
                           f"report.out={tmp_path / 'report'}")) == 0
    assert len(list((tmp_path / "report" / "neurons" / "block_3").glob("*.html"))) == 3


@pytest.mark.parametrize("option,value,words", [
    ("--samples", "0", ["must be at least 1, not 0"]),
    ("--samples", "-1", ["must be at least 1, not -1"]),
    ("--samples", "41", ["41 is more than the 40 samples", "valid: 1..40"]),
    ("--neurons", "0", ["must be at least 1, not 0"]),
    ("--neurons", "-1", ["must be at least 1, not -1"]),
    ("--neurons", "4", ["4 is more than the 3 selected neurons of the largest target", "valid: 1..3"]),
])
def test_the_counts_of_check_rules_are_within_range(option, value, words, capsys):
    refused(capsys, ["check-rules", "demo", "-q", "--set", *SMALL, option, value], option, *words)


@pytest.mark.parametrize("value,words", [("0", ["must be at least 1, not 0"]), ("-1", ["must be at least 1, not -1"]),
                                         ("4", ["4 is more than the 3 neurons of the store's largest target",
                                                "valid: up to 3"])])
def test_the_page_count_of_report_is_within_range(value, words, made, tmp_path, capsys):
    refused(capsys, ["report", str(made), "-q", "--neurons", value, "--out", str(tmp_path / "r")], "--neurons", *words)
    assert not (tmp_path / "r").exists()


def test_the_rule_of_selections_in_python():
    from polypure.attribution.relevance_plan import select_neurons
    from polypure.errors import ConfigError

    # what is accepted: every notation, within the layer, in the order given
    assert select_neurons("all", 4).tolist() == [0, 1, 2, 3]
    assert select_neurons(":", 4).tolist() == [0, 1, 2, 3]
    assert select_neurons("2:", 4).tolist() == [2, 3] and select_neurons(":2", 4).tolist() == [0, 1]
    assert select_neurons(" 1 : 3 ", 4).tolist() == [1, 2] and select_neurons("0:4", 4).tolist() == [0, 1, 2, 3]
    assert select_neurons(3, 4).tolist() == [3] and select_neurons([3, 0], 4).tolist() == [3, 0]
    # the cases that were clipped or let through: a stop past the channels is an error in every notation
    for spec, channels in (("0:400", 320), ("120:140", 128), ([5, 500], 320), ("4:", 4), ([], 8), ("-8:", 16),
                           ("1:1", 4), ("5", 8), ("0:4:2", 8), (2.0, 8), ([1.5], 8), (True, 8)):
        with pytest.raises(ConfigError, match=r"^relevance\.targets\[2\]\.neurons: ") as info:
            select_neurons(spec, channels, key="relevance.targets[2].neurons")
        assert "\n" not in str(info.value)


def test_valid_selections_and_lists_stay_accepted():
    from polypure.config.settings import load_config

    config = load_config(None, ["relevance.targets=[]", "topk.layers=[]"])  # planted neurons alone, their layer's top-K
    assert config.relevance.target_list == [] and config.relevance.planted_list
    for value, kept in (("all", "all"), ("':'", ":"), ("'3:'", "3:"), ("':4'", ":4"), ("7", [7]), ("[3, 1]", [3, 1])):
        assert load_config(None, [*SHORT_FORM, f"relevance.neurons={value}"]).relevance.neurons == kept
