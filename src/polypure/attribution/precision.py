"""Numeric precision and device settings of the relevance computation (``relevance.precision``).

* ``fp32`` (default): every product in float32. On CUDA this also turns cuDNN's TF32 convolutions off
  for the computation (PyTorch allows them by default), so that fp32 means the same on every device.
* ``tf32``: float32 tensors, TensorFloat-32 matrix products and convolutions on Ampere and later GPUs (a
  10-bit mantissa inside the products). It changes nothing on a CPU.
* ``bf16``: the forward pass under ``torch.autocast`` in bfloat16 (CPU and CUDA), the backward in the
  dtypes the forward chose; relevance maps are multiplied, summed and normalised in float32.

On CUDA the computation also runs with cuDNN autotuning on (``torch.backends.cudnn.benchmark``): the
shapes of a run repeat from batch to batch, so the fastest algorithm is picked once per shape.
:func:`resolve_device` turns the config's ``device`` (``auto``, ``cpu``, ``cuda:1``) into a torch device.

Example
-------
>>> import torch

from polypure.errors import ConfigError
>>> from polypure.attribution.precision import computing
>>> with computing(torch.device("cpu"), "bf16"):
...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
torch.bfloat16
"""

from __future__ import annotations

import contextlib

import torch

from polypure.errors import ConfigError

#: The values ``relevance.precision`` takes.
PRECISIONS = ("fp32", "tf32", "bf16")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but this machine has no CUDA device")
    return torch.device(name)


@contextlib.contextmanager
def computing(device: torch.device | str, precision: str = "fp32"):
    """Run the enclosed forward pass at ``precision`` on ``device``: :func:`flags` and :func:`autocast` together."""
    with flags(device, precision), autocast(device, precision):
        yield


def check(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"relevance.precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def flags(device: torch.device | str, precision: str = "fp32"):
    """The CUDA flags of ``precision`` (TF32 on or off, cuDNN autotuning), restored on leaving; nothing elsewhere.

    Enter it around the backward pass too: it decides how the backward's convolutions compute.
    """
    check(precision)
    return _flags(precision == "tf32") if torch.device(device).type == "cuda" else contextlib.nullcontext()


def autocast(device: torch.device | str, precision: str = "fp32"):
    """bfloat16 autocasting for a forward pass at ``bf16``; nothing at the other precisions."""
    if check(precision) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


@contextlib.contextmanager
def _flags(tf32: bool):
    backends = torch.backends
    saved = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark)
    backends.cuda.matmul.allow_tf32 = tf32
    backends.cudnn.allow_tf32 = tf32
    backends.cudnn.benchmark = True
    try:
        yield
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark = saved


def to_device(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch on ``device``; to a GPU through pinned memory, asynchronously (the copy overlaps the work queued)."""
    device = torch.device(device)
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def auto_batch_size(measure, device: torch.device | str, default: int = 64, probe: int = 8,
                    headroom: float = 0.6, largest: int = 2048) -> int:
    """Rows per backward pass for ``relevance.batch_size: auto``.

    On CUDA: the peak memory of one ``probe``-row pass, measured, scaled to ``headroom`` of the free
    memory. Elsewhere ``default`` (a CPU's speed hardly depends on the batch beyond a few dozen rows).

    Parameters
    ----------
    measure : callable
        ``measure(rows)`` runs one pass of that many rows on ``device``.
    device : torch.device or str
    """
    device = torch.device(device)
    if device.type != "cuda":
        return default
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    measure(probe)
    torch.cuda.synchronize(device)
    per_row = max(1, (torch.cuda.max_memory_allocated(device) - base) / probe)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(probe, min(largest, headroom * free / per_row)))
