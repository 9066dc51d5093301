"""What a stage may use of the run it belongs to: the :class:`StageContext` protocol.

:class:`~polypure.experiment.Experiment` implements it; a test or another driver can pass any object
with these members.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from polypure.config.settings import Config
    from polypure.data.datasets import PolypureDataset
    from polypure.models.factory import ExplainedModel
    from polypure.store.hdf5_store import Store


class StageContext(Protocol):
    """The run a stage works for.

    Attributes
    ----------
    config : Config
        The validated run configuration.
    device : torch.device
        Where the model computes.
    progress : bool
        Whether to show progress bars (and print the summary).
    overwrite : bool
        Whether stale results in the store are recomputed instead of refused.
    executor : RayExecutor or None
        Where the top-K, relevance and embedding work runs; None computes in this process.
    """

    config: Config
    device: torch.device
    progress: bool
    overwrite: bool
    executor: Any

    @property
    def model(self) -> ExplainedModel:
        """The explained model (built on first use)."""

    @property
    def dataset(self) -> PolypureDataset:
        """The samples (built on first use)."""

    @property
    def num_workers(self) -> int:
        """Loader workers for the data."""

    @property
    def batch_size(self) -> int:
        """Samples per forward pass of the top-K stage."""

    def open_store(self) -> AbstractContextManager[Store]:
        """The store, opened for writing."""

    def layer_shapes(self, layers: list[str]) -> dict[str, tuple]:
        """Output shapes (without batch) of layers."""

    def log(self, message: str) -> None:
        """Report a line of progress."""
