"""The one owner of what kind of file system entry a user's path must be.

Every path a user gives (a config file, a store, a weights file, a data root, a factory's ``.py`` file, an
output folder) is checked here before any work: a folder where a file is expected, a file where a folder
is expected, or a special file (``/dev/null``, a FIFO, a socket, a device) where a regular file is expected
is refused with one line that names the path, what was expected and what was found. Nothing is opened
or created to find out: a FIFO is never read (that would wait forever) and an output is never written.

Input paths must exist (:func:`require_file`, :func:`require_folder`); output paths may be new, but what
exists of them, and the nearest existing folder above them, must be of the right kind
(:func:`require_output_file`, :func:`require_output_folder`).

Example
-------
>>> from polypure.config.paths import require_file
>>> require_file("/", "config file")
Traceback (most recent call last):
polypure.errors.ConfigError: config file '/': expected a file, found a folder
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from polypure.errors import ConfigError, InputError

#: File endings that make a weights setting a path rather than a library tag (``DEFAULT``, ``openai``).
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

_SPECIAL = ((stat.S_ISCHR, "a special file (character device)"), (stat.S_ISBLK, "a special file (block device)"),
            (stat.S_ISFIFO, "a special file (FIFO)"), (stat.S_ISSOCK, "a special file (socket)"))


def kind_of(path: str | os.PathLike) -> str | None:
    """What ``path`` is, in words (``"a folder"``, ``"a regular file"``, ``"a special file (FIFO)"``, ...).

    Symbolic links are followed; a link to nothing is ``"a broken symbolic link"``. None where nothing
    exists at ``path``.

    Raises
    ------
    ConfigError
        If the path cannot be examined (a folder on the way that may not be read).
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "a broken symbolic link" if os.path.islink(path) else None
    except OSError as exc:
        raise ConfigError(f"{str(path)!r} cannot be examined: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a regular file"
    for test, words in _SPECIAL:
        if test(mode):
            return words
    return "a special file"


def _blocking_ancestor(path: Path) -> tuple[Path, str] | None:
    """The nearest existing entry above a missing ``path`` and its kind, where that entry is not a folder."""
    for parent in path.absolute().parents:
        found = kind_of(parent)
        if found is not None:
            return None if found == "a folder" else (parent, found)
    return None


def _missing(path: Path, what: str, expected: str, error: type[InputError]) -> InputError:
    blocked = _blocking_ancestor(path)
    if blocked is not None:
        return error(f"{what} {str(path)!r}: expected a folder at {str(blocked[0])!r}, found {blocked[1]}")
    return error(f"{what} {str(path)!r} does not exist")


def require_file(path: str | os.PathLike, what: str, error: type[InputError] = ConfigError) -> Path:
    """``path`` as a Path, if it is an existing regular file (or a link to one).

    Parameters
    ----------
    path : str or PathLike
    what : str
        The path's role as the message names it, key first where there is one (``"data.path: file"``,
        ``"weights file"``, ``"store"``).
    error : type of InputError
        What to raise (:class:`~polypure.errors.ConfigError`; a store is a
        :class:`~polypure.errors.StoreError`).

    Raises
    ------
    InputError
        ``"<what> '<path>' does not exist"``, or ``"<what> '<path>': expected a file, found <kind>"``.
    """
    return _require(path, what, error, "a file", output=False)


def require_folder(path: str | os.PathLike, what: str, error: type[InputError] = ConfigError) -> Path:
    """``path`` as a Path, if it is an existing folder (see :func:`require_file` for the parameters)."""
    return _require(path, what, error, "a folder", output=False)


def require_output_file(path: str | os.PathLike, what: str, error: type[InputError] = ConfigError) -> Path:
    """``path`` as a Path, if a file can be written there: a regular file or nothing, below folders only.

    Nothing is created. See :func:`require_file` for the parameters.
    """
    return _require(path, what, error, "a file", output=True)


def require_output_folder(path: str | os.PathLike, what: str, error: type[InputError] = ConfigError) -> Path:
    """``path`` as a Path, if a folder can be written there: a folder or nothing, below folders only.

    Nothing is created. See :func:`require_file` for the parameters.
    """
    return _require(path, what, error, "a folder", output=True)


def _require(path, what: str, error: type[InputError], expected: str, output: bool) -> Path:
    """The one check behind the four ``require_*``: ``expected`` is ``"a file"`` or ``"a folder"``.

    An input must exist; an output may be missing as long as nothing but folders stands above it.
    """
    path = Path(path)
    found = kind_of(path)
    if found is None:
        if not output:
            raise _missing(path, what, expected, error)
        blocked = _blocking_ancestor(path)
        if blocked is not None:
            raise error(f"{what} {str(path)!r}: expected a folder at {str(blocked[0])!r}, found {blocked[1]}")
    elif found != {"a file": "a regular file", "a folder": "a folder"}[expected]:
        raise error(f"{what} {str(path)!r}: expected {expected}, found {found}")
    return path


def names_a_file(value, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> bool:
    """Whether a setting that takes a library tag or a file (``model.weights``) names a file.

    It does when it ends in one of ``suffixes``, holds a path separator, or is an existing regular file:
    tags (``DEFAULT``, ``openai``) are plain words.
    """
    if not isinstance(value, (str, os.PathLike)):
        return False
    text = os.fspath(value)
    return text.endswith(suffixes) or "/" in text or os.sep in text or Path(text).is_file()
