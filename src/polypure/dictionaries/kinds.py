"""Kinds of dictionary by name: how one is learned from a layer's activations, and how it encodes them.

A kind is a class with the interface of :class:`DictionaryKind`: built from its config entry
(``dictionaries[]``), the layer's channel count and the run's device, it is initialised on the training
positions, trained epoch by epoch (the stage checkpoints :meth:`~DictionaryKind.training_state` after every
epoch and resumes from it), and then encodes activation vectors into codes ``z`` with
``a ≈ z D + bias``. Names in configs map through :data:`DICTIONARY_KINDS`; installed packages add kinds
through the entry-point group ``polypure.dictionaries``.

Built in, both from the ``overcomplete`` package (extra ``polypure[dict]``):

* ``topk_sae``: :class:`overcomplete.sae.TopKSAE` (a linear encoder, ReLU, the ``top_k`` largest codes kept),
  trained by :func:`overcomplete.sae.train_sae` with Adam on the mean squared error, on activations centred
  by their training mean (the bias);
* ``nmf``: :class:`overcomplete.optimization.NMF` (``a ≈ z D``, ``z, D ≥ 0``) for non-negative activations,
  trained by alternating rounds: codes solved for the dictionary, then the dictionary updated for them
  (hierarchical alternating least squares, HALS). Codes are always solved from zero for a fixed number of
  sweeps (:func:`nonnegative_codes`), so that a code is a function of the dictionary and the activation vector
  alone.

polypure imports overcomplete only through :func:`import_overcomplete`.

Example
-------
>>> from polypure.dictionaries.kinds import DICTIONARY_KINDS
>>> sorted(name for name in ("topk_sae", "nmf") if name in DICTIONARY_KINDS)
['nmf', 'topk_sae']
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import numpy as np
import torch

from polypure.errors import ConfigError
from polypure.registry import Registry

#: Dictionary kinds by name; plugins register under the entry-point group ``polypure.dictionaries``.
DICTIONARY_KINDS = Registry("dictionary kind", group="polypure.dictionaries")

#: How to install what the built-in kinds need.
EXTRA = "pip install 'polypure[dict]'"

#: ``nmf``: sweeps of the coordinate descent that solves the codes of activation vectors (:func:`nonnegative_codes`).
#: Always all of them: the updates of one vector's code do not involve the others', so a code does not depend on the
#: batch it is encoded in.
NMF_CODE_ITERATIONS = 100
#: ``nmf``: sweeps of the dictionary's update per training round.
NMF_DICTIONARY_SWEEPS = 3
#: Activation vectors encoded at once (bounds the memory of the codes).
ENCODE_CHUNK = 8192


def import_overcomplete(what: str = "dictionaries"):
    """The ``overcomplete`` package: the one place polypure imports it.

    overcomplete 0.3.0 builds colormaps when it is imported, with ``matplotlib.cm.get_cmap``, which matplotlib
    3.9 removed. Where that attribute is missing, an alias is installed first: ``matplotlib.colormaps``'
    colormap of that name, resampled to ``lut`` entries where given. Nothing is changed where matplotlib still
    has it.

    Parameters
    ----------
    what : str
        Who needs it, for the error (``dictionaries[0] (sae): kind 'topk_sae'``).

    Raises
    ------
    ConfigError
        One line naming the extra to install, where overcomplete cannot be imported.
    """
    import matplotlib
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):
        def get_cmap(name=None, lut=None):
            cmap = matplotlib.colormaps.get_cmap(name)
            return cmap.resampled(lut) if lut is not None else cmap

        matplotlib.cm.get_cmap = get_cmap
    try:
        import overcomplete
    except ImportError:
        raise ConfigError(f"{what} needs the overcomplete package: {EXTRA}") from None
    return overcomplete


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu"):
    """Seed the global random state of torch and numpy for the block, and leave it as it was after it.

    The random initialisation of a dictionary (torch) and the SVD of NMF's initialisation (scikit-learn, numpy's
    global state) are then the same in every run with the same seed, whatever ran before.
    """
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            yield
    finally:
        np.random.set_state(state)


def as_arrays(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors as numpy arrays (a store's datasets)."""
    return {name: value.detach().cpu().numpy().copy() for name, value in tensors.items()}


def as_tensor(array: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """A stored array as a tensor in memory of torch's own (a copy).

    Not a view of numpy's memory: BLAS kernels may round differently for differently aligned data, and a resumed
    training must compute exactly what an uninterrupted one does.
    """
    return torch.tensor(np.asarray(array), device=device)


class DictionaryKind:
    """The interface of a dictionary kind; subclasses register in :data:`DICTIONARY_KINDS`.

    Parameters
    ----------
    spec : DictionarySection
        The config entry (``n_concepts``, ``epochs``, the kind's ``options``, ...).
    channels : int
        Channels of the layer (the length of an activation vector).
    device : torch.device
        Where it trains and encodes.

    Notes
    -----
    The stage builds a kind inside :func:`seeded`, so that its random initialisation is the run's; it calls
    :meth:`initialise` (or :meth:`load_training_state` to resume), :meth:`fit_epoch` once per epoch, then
    :meth:`finish`. A finished dictionary is stored as :meth:`dictionary`, :meth:`bias` and
    :meth:`encoder_state`; :meth:`load_encoder` rebuilds one from them, to :meth:`encode`.
    """

    def __init__(self, spec, channels: int, device: torch.device):
        self.spec = spec
        self.channels = channels
        self.device = torch.device(device)

    @classmethod
    def check(cls, spec, key: str) -> None:
        """Refuse, before any stage runs, what cannot work (a missing package, an unknown option).

        Parameters
        ----------
        spec : DictionarySection
        key : str
            How errors name the entry (``dictionaries[0] (sae)``).
        """

    def initialise(self, train: torch.Tensor) -> None:
        """Start from the training positions (N, C), before the first epoch."""
        raise NotImplementedError

    def fit_epoch(self, train: torch.Tensor, epoch: int, seed: int) -> None:
        """Train for one epoch on the training positions (N, C); ``seed`` is the run's (shuffles derive from it)."""
        raise NotImplementedError

    def training_state(self) -> dict[str, np.ndarray]:
        """Everything needed to resume training after this epoch (weights, optimizer, bias)."""
        raise NotImplementedError

    def load_training_state(self, state: dict[str, np.ndarray]) -> None:
        """Resume from :meth:`training_state`."""
        raise NotImplementedError

    def finish(self) -> None:
        """Training is over: from now on the kind only encodes."""

    def dictionary(self) -> torch.Tensor:
        """The concepts (n_concepts, C)."""
        raise NotImplementedError

    def bias(self) -> torch.Tensor:
        """The bias (C,) of the reconstruction ``z D + bias``."""
        return torch.zeros(self.channels, device=self.device)

    def encoder_state(self) -> dict[str, np.ndarray]:
        """The arrays :meth:`encode` needs besides the dictionary and the bias."""
        return {}

    def load_encoder(self, dictionary: np.ndarray, bias: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Rebuild a finished dictionary from what the store keeps."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (N, n_concepts) of activation vectors (N, C)."""
        raise NotImplementedError

    def encode_all(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` in chunks of :data:`ENCODE_CHUNK` vectors, without autograd."""
        with torch.no_grad():
            return torch.cat([self.encode(x[i:i + ENCODE_CHUNK]) for i in range(0, len(x), ENCODE_CHUNK)]) \
                if len(x) else torch.zeros((0, self.spec.n_concepts), device=self.device)


def nonnegative_codes(x: torch.Tensor, dictionary: torch.Tensor, sweeps: int = NMF_CODE_ITERATIONS) -> torch.Tensor:
    """Non-negative codes ``z`` minimising ``||x - z D||²``, by HALS coordinate descent from zero.

    The rule of overcomplete's ``hierarchical_als`` for the codes alone, ``z_k <- max(0, z_k + (C_k - B_k z) /
    B_kk)`` with ``C = D x^T`` and ``B = D D^T``, but with ``C`` and ``B`` computed once and the codes held
    concept by concept in contiguous rows: the same numbers, ten times faster on a CPU.

    Parameters
    ----------
    x : Tensor (N, C)
    dictionary : Tensor (K, C)
    sweeps : int
        Passes over the K concepts.

    Returns
    -------
    Tensor (N, K)
    """
    gram = dictionary @ dictionary.T
    target = dictionary @ x.T
    codes = torch.zeros_like(target)
    for _ in range(sweeps):
        for k in range(len(codes)):
            codes[k] = torch.relu(codes[k] + (target[k] - gram[k] @ codes) / (gram[k, k] + 1e-10))
    return codes.T


def _no_options(spec, key: str, kind: str) -> None:
    if spec.options:
        raise ConfigError(f"{key}: kind {kind!r} takes no options (got {', '.join(sorted(spec.options))})")


def _mse(x, x_hat, pre_codes, codes, dictionary):
    """The training loss of ``topk_sae``: the mean squared reconstruction error (sparsity is the top-k's)."""
    return (x - x_hat).square().mean()


@DICTIONARY_KINDS.register("topk_sae")
class TopKSAEKind(DictionaryKind):
    """overcomplete's TopKSAE, trained with Adam on activations centred by their training mean."""

    requires: ClassVar[str] = "overcomplete"

    def __init__(self, spec, channels: int, device: torch.device):
        super().__init__(spec, channels, device)
        import_overcomplete()
        from overcomplete.sae import TopKSAE

        top_k = spec.top_k if spec.top_k is not None else max(spec.n_concepts // 10, 1)
        self.model = TopKSAE(channels, spec.n_concepts, top_k=top_k, device=str(self.device))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=spec.lr)
        self._bias = torch.zeros(channels, device=self.device)

    @classmethod
    def check(cls, spec, key: str) -> None:
        """The ``overcomplete`` package must import; the kind takes no options."""
        import_overcomplete(f"{key}: kind 'topk_sae'")
        _no_options(spec, key, "topk_sae")

    def initialise(self, train: torch.Tensor) -> None:
        """The bias is the mean of the training positions."""
        self._bias = train.mean(dim=0)

    def fit_epoch(self, train: torch.Tensor, epoch: int, seed: int) -> None:
        """One pass over the centred positions in an order drawn from ``(seed, epoch)``."""
        from overcomplete.sae import train_sae

        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        centred = train - self._bias
        size = self.spec.batch_size
        batches = [centred[order[i:i + size].to(train.device)] for i in range(0, len(train), size)]
        train_sae(self.model, batches, _mse, self.optimizer, nb_epochs=1, monitoring=0, device=str(self.device))

    def training_state(self) -> dict[str, np.ndarray]:
        """The model's state, Adam's per-parameter state and the bias."""
        state = {f"model.{name}": value for name, value in self.model.state_dict().items()}
        for index, values in self.optimizer.state_dict()["state"].items():
            state.update({f"optimizer.{index}.{name}": value for name, value in values.items()})
        state["bias"] = self._bias
        return as_arrays(state)

    def load_training_state(self, state: dict[str, np.ndarray]) -> None:
        """Resume from :meth:`training_state`."""
        self.model.load_state_dict({name.removeprefix("model."): as_tensor(value)
                                    for name, value in state.items() if name.startswith("model.")})
        saved = self.optimizer.state_dict()
        saved["state"] = {}
        for name, value in state.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                saved["state"].setdefault(int(index), {})[key] = as_tensor(value)
        self.optimizer.load_state_dict(saved)
        self._bias = as_tensor(state["bias"], self.device)

    def finish(self) -> None:
        """Evaluation mode: the dictionary is fused (normalised) once."""
        self.model.eval()

    def dictionary(self) -> torch.Tensor:
        """The fused dictionary (n_concepts, C)."""
        return self.model.get_dictionary().detach()

    def bias(self) -> torch.Tensor:
        """The training mean of the activations."""
        return self._bias

    def encoder_state(self) -> dict[str, np.ndarray]:
        """The TopKSAE's state dict (encoder weights and the dictionary's raw weights)."""
        return as_arrays(self.model.state_dict())

    def load_encoder(self, dictionary: np.ndarray, bias: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Load the state dict and the bias; evaluation mode."""
        self.model.load_state_dict({name: as_tensor(value) for name, value in state.items()})
        self.model.eval()
        self._bias = as_tensor(bias, self.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The top-k codes of the centred activations."""
        return self.model.encode(x.to(self.device) - self._bias)[1]


@DICTIONARY_KINDS.register("nmf")
class NMFKind(DictionaryKind):
    """overcomplete's NMF, trained in rounds that solve the codes from zero and update the dictionary."""

    requires: ClassVar[str] = "overcomplete"

    def __init__(self, spec, channels: int, device: torch.device):
        super().__init__(spec, channels, device)
        import_overcomplete()
        from overcomplete.optimization import NMF

        self.model = NMF(spec.n_concepts, device=str(self.device), solver="hals")
        self.D = torch.zeros((spec.n_concepts, channels), device=self.device)

    @classmethod
    def check(cls, spec, key: str) -> None:
        """The ``overcomplete`` package must import; the kind takes no options."""
        import_overcomplete(f"{key}: kind 'nmf'")
        _no_options(spec, key, "nmf")

    def initialise(self, train: torch.Tensor) -> None:
        """NNDSVDa (scikit-learn's) where the concepts are no more than the positions and channels, else random.

        Raises
        ------
        ConfigError
            If the activations have negative values: NMF factorises non-negative data only.
        """
        low = float(train.min()) if len(train) else 0.0
        if low < 0:
            raise ConfigError(f"dictionary {self.spec.id!r}: kind 'nmf' needs non-negative activations; layer "
                              f"{self.spec.layer!r} has values down to {low:.3g} (use kind 'topk_sae', or a layer "
                              "after a ReLU)")
        if self.spec.n_concepts <= min(train.shape):
            _, D = self.model.init_nndsvda(train)
        else:
            D = self.model.init_random_d(train)
        # contiguous, as a dictionary loaded from the store is: BLAS sums in another order over transposed memory,
        # and a resumed training must compute exactly what an uninterrupted one does
        self.D = D.to(self.device, torch.float32).contiguous()

    def fit_epoch(self, train: torch.Tensor, epoch: int, seed: int) -> None:
        """Codes solved for the dictionary, then :data:`NMF_DICTIONARY_SWEEPS` sweeps of the dictionary's update."""
        from overcomplete.optimization.nmf import hierarchical_als

        codes = self.encode(train).contiguous()
        _, dictionary = hierarchical_als(train, codes, self.D.clone(), update_Z=False, max_iter=NMF_DICTIONARY_SWEEPS)
        self.D = dictionary.contiguous()

    def training_state(self) -> dict[str, np.ndarray]:
        """The dictionary: the codes are a function of it."""
        return as_arrays({"dictionary": self.D})

    def load_training_state(self, state: dict[str, np.ndarray]) -> None:
        """Resume from the dictionary."""
        self.D = as_tensor(state["dictionary"], self.device)

    def dictionary(self) -> torch.Tensor:
        """The non-negative concepts (n_concepts, C)."""
        return self.D

    def load_encoder(self, dictionary: np.ndarray, bias: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """The dictionary is all NMF encodes with."""
        self.D = as_tensor(dictionary, self.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Non-negative least-squares codes (:func:`nonnegative_codes`)."""
        return nonnegative_codes(x.to(self.device, torch.float32), self.D)


def make_kind(spec, channels: int, device: torch.device) -> DictionaryKind:
    """The kind of a config entry, built (call it inside :func:`seeded`).

    Raises
    ------
    ConfigError
        For an unknown kind, listing the known ones.
    """
    return DICTIONARY_KINDS.get(spec.kind)(spec, channels, device)


def describe(spec: Any) -> str:
    """A config entry in a few words: ``sae (topk_sae, 512 concepts on block_3)``."""
    return f"{spec.id} ({spec.kind}, {spec.n_concepts} concepts on {spec.layer})"
