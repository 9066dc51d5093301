"""The one rule for selections and counts: never empty, never past what exists, never clipped.

A neuron selection (``relevance.neurons``, ``relevance.targets[i].neurons``) names channel ids
``0 .. C-1`` of a layer with ``C`` channels, in one of four notations:

* ``all``: every channel;
* an id ``n``, or a list of ids: each ``0 <= n < C``, at least one, none twice;
* ``"start:stop"``: the ids ``start .. stop-1``; an open start is 0, an open stop is ``C``. It must satisfy
  ``0 <= start < stop <= C``. Unlike a Python slice, a stop past ``C`` is an error, not clipped (``"0:400"``
  on 320 channels is refused rather than run as 320 neurons), and a range that selects nothing is refused.

Negative numbers are refused in every notation: a neuron's id is its channel's position, which the store
and the report show, and there is no counting from the end.

A count of things to take (``topk.k`` and ``data.limit`` of the samples, ``relevance.planted.pairs`` of a
layer's channels, ``report.neurons`` and the ``--neurons`` / ``--samples`` options) is at least 1 and at
most what exists (:func:`check_count`). Every refusal is one line naming the key, the value and the valid
range.

The form of a selection is checked when a config is read (:func:`selection_form`, no model needed); its
range once the layer's width is known (:func:`select_neurons`, before the first stage).

Example
-------
>>> from polypure.config.selection import select_neurons
>>> select_neurons("2:5", channels=8).tolist(), select_neurons("6:", channels=8).tolist()
([2, 3, 4], [6, 7])
>>> select_neurons("0:400", channels=320)
Traceback (most recent call last):
polypure.errors.ConfigError: relevance.neurons: '0:400' reaches past the last channel of a layer with 320 channels (a range start:stop needs 0 <= start < stop <= 320; stops are not clipped)
"""

from __future__ import annotations

import re
from numbers import Integral

import numpy as np

from polypure.errors import ConfigError

_RANGE = re.compile(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*")


def _is_id(value) -> bool:
    # bool is an int to Python, but `neurons: true` is no channel id
    return isinstance(value, (Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def _range(text: str) -> tuple[int | None, int | None] | None:
    match = _RANGE.fullmatch(text)
    if match is None:
        return None
    start, stop = match.groups()
    return (None if start is None else int(start)), (None if stop is None else int(stop))


def selection_form(value, key: str = "relevance.neurons"):
    """Check the notation of a neuron selection (not its range) and return it normalised.

    Parameters
    ----------
    value : str, int or list of int
    key : str
        The config key, for the message (empty: none, as pydantic puts the key in front).

    Returns
    -------
    str or list of int
        ``"all"``, the ``"start:stop"`` text as given, or the ids as a list (one id becomes ``[id]``).

    Raises
    ------
    ConfigError
        For any other form, a negative number, an empty list, a repeated id, or a range whose start is not
        below its stop.
    """
    def refuse(text: str) -> ConfigError:
        return ConfigError(f"{key}: {text}" if key else text)

    if isinstance(value, str):
        if value.strip() == "all":
            return "all"
        bounds = _range(value)
        if bounds is None:
            raise refuse(f"neurons must be 'all', a list of channel ids or 'start:stop', not {value!r}")
        start, stop = bounds
        if (start is not None and start < 0) or (stop is not None and stop < 0):
            raise refuse(f"{value!r} has a negative number; channel ids start at 0 and ranges do not count from "
                         "the end (give start:stop with 0 <= start < stop)")
        if start is not None and stop is not None and start >= stop:
            raise refuse(f"{value!r} selects no neuron (a range start:stop needs start < stop)")
        return value
    if _is_id(value):
        value = [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        ids = list(value.tolist() if isinstance(value, np.ndarray) else value)
        if not ids:
            raise refuse("an empty list selects no neuron; give at least one channel id, a range 'start:stop' "
                         "or 'all'")
        bad = [i for i in ids if not _is_id(i)]
        if bad:
            raise refuse(f"{bad[0]!r} is not a channel id (ids are whole numbers from 0)")
        negative = [int(i) for i in ids if i < 0]
        if negative:
            raise refuse(f"neuron {negative[0]} is negative; channel ids start at 0 (no counting from the end)")
        twice = sorted({int(i) for i in ids if ids.count(i) > 1})
        if twice:
            raise refuse(f"neuron {twice[0]} is listed twice")
        return [int(i) for i in ids]
    raise refuse(f"neurons must be 'all', a channel id, a list of channel ids or 'start:stop', not {value!r}")


def select_neurons(spec, channels: int, key: str = "relevance.neurons") -> np.ndarray:
    """The channel ids a selection names in a layer of ``channels`` channels (the module docstring's rule).

    Parameters
    ----------
    spec : str, int or list of int
        ``all``, an id, a list of ids, or ``"start:stop"``.
    channels : int
        The layer's width.
    key : str
        The config key, for the message.

    Returns
    -------
    ndarray of int64
        At least one id, each in ``0 .. channels-1``, none twice, in the order given.

    Raises
    ------
    ConfigError
        One line naming the key, the selection and the valid range.
    """
    spec = selection_form(spec, key)
    if spec == "all":
        return np.arange(channels, dtype=np.int64)
    if isinstance(spec, str):
        start, stop = _range(spec)
        start = 0 if start is None else start
        stop = channels if stop is None else stop
        need = f"a range start:stop needs 0 <= start < stop <= {channels}"
        if start >= channels:
            raise ConfigError(f"{key}: {spec!r} selects no neuron of a layer with {channels} channels ({need})")
        if stop > channels:
            raise ConfigError(f"{key}: {spec!r} reaches past the last channel of a layer with {channels} channels "
                              f"({need}; stops are not clipped)")
        return np.arange(start, stop, dtype=np.int64)
    ids = np.asarray(spec, dtype=np.int64)
    bad = ids[ids >= channels]
    if len(bad):
        raise ConfigError(f"{key}: neuron {int(bad[0])} out of range for a layer with {channels} channels "
                          f"(ids 0..{channels - 1})")
    return ids


def check_count(value: int, available: int, key: str, of: str) -> int:
    """A count of things to take must be at least 1 and at most ``available``.

    Parameters
    ----------
    value : int
    available : int
        How many exist.
    key : str
        The key or option, as the message names it (``"topk.k"``, ``"--samples"``).
    of : str
        What is counted, in words (``"samples of the data"``).

    Raises
    ------
    ConfigError
        ``"<key>: <value> ... (valid: 1..<available>)"``.
    """
    if not _is_id(value):
        raise ConfigError(f"{key}: {value!r} is not a whole number (valid: 1..{available})")
    if value < 1:
        raise ConfigError(f"{key}: {value} takes nothing; it must be at least 1 (valid: 1..{available})")
    if value > available:
        raise ConfigError(f"{key}: {value} is more than the {available} {of} (valid: 1..{available})")
    return int(value)
