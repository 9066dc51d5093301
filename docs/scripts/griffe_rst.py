"""A Griffe extension that reads polypure's reStructuredText inline markup as the API pages' Markdown needs it.

polypure's numpy docstrings cross-reference with Sphinx roles (``:func:`~polypure.store.results.export```) and
introduce literal blocks with ``::``. mkdocstrings renders docstrings as Markdown, where both would show as
typed. This extension rewrites them before rendering: a role becomes a code span linked to the object's API
section where the object has one (an *optional* cross-reference, so a name that resolves nowhere, such as a
class of another library, stays plain code instead of failing the strict build), and ``::`` becomes ``:``
before the indented block, which Markdown already shows as code. An ``Example`` section, as polypure's
modules title it, is read as numpydoc's ``Examples`` (the title Griffe knows), so that its doctests show as
code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:mod|func|class|meth|attr|data|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`<>]+)`")
_LITERAL_MARK = re.compile(r"(?m)^(?P<text>.*?\S)?::[ \t]*$")
_EXAMPLE_TITLE = re.compile(r"(?m)^(?P<indent>[ \t]*)Example\n(?P=indent)-{7,}[ \t]*$")


def _identifier(obj: griffe.Object, target: str) -> str:
    """The full path of a role's target, resolved in the scope of the object whose docstring names it."""
    target = target.strip().removesuffix("()")
    if target.startswith("polypure."):
        return target
    first, dot, rest = target.partition(".")
    try:
        return obj.resolve(first) + dot + rest
    except Exception:  # unknown in every enclosing scope: left as written, an optional reference
        return target


def rewrite(obj: griffe.Object, text: str) -> str:
    """Docstring text with roles as optional cross-references, ``::`` marks as ``:``, ``Example`` as ``Examples``."""

    def role(match: re.Match) -> str:
        target = match["target"].strip()
        title = target.rsplit(".", 1)[-1] if match["tilde"] else target
        identifier = _identifier(obj, target)
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    def literal(match: re.Match) -> str:
        # "Layout::" introduces the block with a colon; a "::" alone on its line introduces it silently
        return f"{match['text']}:" if match["text"] else ""

    text = _EXAMPLE_TITLE.sub(lambda m: f"{m['indent']}Examples\n{m['indent']}--------", text)
    return _LITERAL_MARK.sub(literal, _ROLE.sub(role, text))


def comment_docstring(obj: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above an attribute (Sphinx's attribute docstrings), if any."""
    lines = obj.lines_collection[obj.filepath] if obj.filepath in obj.lines_collection else None
    if not lines or not obj.lineno:
        return None
    found = []
    number = obj.lineno - 2  # the line above, 0-based
    while number >= 0 and lines[number].lstrip().startswith("#:"):
        found.insert(0, lines[number].lstrip()[2:].strip())
        number -= 1
    return "\n".join(found) or None


class ReStructuredTextRoles(griffe.Extension):
    """Rewrite Sphinx roles, ``::`` literal marks and ``Example`` titles in every docstring of the package.

    A module attribute documented by ``#:`` comments above it (``#: Stage modules, in run order.``) gets them
    as its docstring, so that it has an entry in the API pages.
    """

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the object's docstring, once the whole package is loaded (so that names resolve)."""
        if obj.docstring is None and obj.is_attribute:
            text = comment_docstring(obj)
            if text is not None:
                obj.docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj, obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite the top package's own docstring, which :meth:`on_object` is not called for."""
        if pkg.docstring is not None:
            pkg.docstring.value = rewrite(pkg, pkg.docstring.value)
