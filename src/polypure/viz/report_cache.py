"""The report's record of what it drew from what (``manifest.json``), so that writing again is incremental.

Every drawn file (figure or thumbnail) is keyed by :func:`digest` of everything it is drawn from: the store
data its figure function reads, its settings, the data's identity and the drawing code (:func:`code_key`).
:class:`Outputs` tells which files a previous write left up to date, records what this write drew, and at
the end removes from the report's own folders (:data:`OWNED`) whatever this write did not produce.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from polypure import __version__

#: The report's record of what it drew from what.
MANIFEST = "manifest.json"
#: Folders of the report that belong to ``write_report`` alone (files it did not write there are removed).
OWNED = ("figures", "thumbs", "neurons")
#: The modules of :mod:`polypure.viz` whose code decides what a drawn figure or thumbnail shows: an edit to
#: any of them redraws every file.
DRAWING_MODULES = ("figures", "figure_data", "imaging", "thumbnails")
_MANIFEST_FORMAT = 1


def digest(*parts) -> str:
    """A hash of numbers, strings, arrays and (nested) lists and dicts of them; order counts."""
    h = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)
            if array.dtype.kind in "OSU":
                feed([str(v) for v in array.ravel().tolist()] + [array.shape])
                return
            h.update(f"a{array.dtype.str}{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
        elif isinstance(value, dict):
            h.update(b"{")
            for key, item in value.items():
                feed(key)
                feed(item)
            h.update(b"}")
        elif isinstance(value, (list, tuple)):
            h.update(b"[")
            for item in value:
                feed(item)
            h.update(b"]")
        else:
            h.update(f"{type(value).__name__}:{value!r};".encode())

    feed(parts)
    return h.hexdigest()[:32]


def code_key() -> str:
    """The drawing code and version: a new polypure, or an edit to a :data:`DRAWING_MODULES` file, redraws all."""
    # the files are read, not imported: this module stays below the ones it keys
    here = Path(__file__).parent
    return digest(__version__, *((here / f"{name}.py").read_bytes() for name in DRAWING_MODULES))


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` unless the file holds exactly that already; whether it wrote."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


class Outputs:
    """The files one ``write_report`` produces, and which of them a previous one left up to date.

    Parameters
    ----------
    out : Path
        The report folder; its ``manifest.json``, when there is one of this format, tells what the
        previous write drew from what.
    """

    def __init__(self, out: Path):
        self.out = out
        previous = {}
        try:
            previous = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        if not isinstance(previous, dict) or previous.get("format") != _MANIFEST_FORMAT:
            previous = {}
        self.previous: dict[str, dict] = previous.get("drawings", {})
        self.previous_data: dict = previous.get("data", {})
        self.drawings: dict[str, dict] = {}
        self.written: set[str] = set()
        self.drawn = self.kept = self.pages = 0

    def rel(self, path: Path) -> str:
        """``path`` relative to the report folder, with forward slashes (the manifest's names)."""
        return Path(os.path.relpath(path, self.out)).as_posix()

    def cached(self, files: list[Path], key: str) -> dict | None:
        """The previous entry of a drawing of ``files`` if it was drawn from the same inputs (and recorded)."""
        name = self.rel(files[0])
        entry = self.previous.get(name)
        if entry is None or entry.get("key") != key:
            return None
        if entry.get("error") is None and not all(f.is_file() for f in files):
            return None
        self.drawings[name] = entry
        self.kept += 1
        return entry

    def record(self, files: list[Path], key: str, error: str | None = None) -> None:
        """A drawing just made (or failed: its error is kept, so the same inputs do not fail again)."""
        self.drawings[self.rel(files[0])] = {"key": key, "files": [] if error else [self.rel(f) for f in files],
                                             "error": error}
        self.drawn += 1

    def write_text(self, path: Path, text: str) -> None:
        """Write a page, unless it already holds exactly this text."""
        self.written.add(self.rel(path))
        self.pages += write_if_changed(path, text)

    def finish(self, data: dict) -> int:
        """Remove what this write did not produce from the owned folders, save the manifest; files removed."""
        keep = set(self.written) | {f for entry in self.drawings.values() for f in entry.get("files", [])}
        removed = 0
        for folder in OWNED:
            root = self.out / folder
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if path.is_dir():
                    if not any(path.iterdir()):
                        path.rmdir()
                elif self.rel(path) not in keep:
                    path.unlink()
                    removed += 1
            if not any(root.iterdir()):
                root.rmdir()
        manifest = {"format": _MANIFEST_FORMAT, "polypure": __version__, "data": data,
                    "drawings": dict(sorted(self.drawings.items()))}
        write_if_changed(self.out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        return removed
