"""The store's layout has one owner, polypure.store.schema: no other module spells a store path."""

from __future__ import annotations

import re
from pathlib import Path

import polypure

PACKAGE = Path(polypure.__file__).resolve().parent
OWNER = PACKAGE / "store" / "schema.py"
#: A string literal (or f-string) naming a path under one of the store's groups.
PATH = re.compile(r"""["'](?:/)?(?:samples|topk|relevance|planted|clusters|embeddings|metrics|crops|comparisons|"""
                  r"""dictionaries)/""")
#: How a planted target is spelled.
PLANTED = re.compile(r"""["']@planted["']""")


def offenders() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == OWNER:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PATH.search(code) or PLANTED.search(code):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    return found


def test_the_pattern_finds_store_paths():
    assert PATH.search('store.read(f"metrics/{target}/x")')
    assert PATH.search("x = 'clusters/' + target")
    assert PLANTED.search('target.endswith("@planted")')
    assert not PATH.search("'a layer of the metrics table'")


def test_the_owner_is_the_schema_module():
    """The owner exists and names the groups and the planted suffix, so that a moved owner fails here."""
    text = OWNER.read_text()
    assert '"@planted"' in text
    for group in ("samples", "topk", "relevance", "planted", "clusters", "embeddings", "metrics", "crops",
                  "comparisons", "dictionaries"):
        assert f'_GROUP = "{group}"' in text


def test_no_store_path_outside_the_schema_module():
    assert offenders() == []
