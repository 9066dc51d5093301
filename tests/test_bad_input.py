"""Issue 13: bad input ends in one line naming the problem, exit status 2, and a store present before unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from polypure import Experiment
from polypure.cli import main
from polypure.data import to_rgb
from tests.nets import tiny

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
