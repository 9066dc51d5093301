"""Write the generated pages of the site at build time (run by the mkdocs-gen-files plugin).

* ``reference/api/``: an overview of the modules (the code map) and a page per module of ``src/polypure``,
  found on disk, with its navigation in ``reference/api/SUMMARY.md`` for mkdocs-literate-nav;
* ``reference/cli.md``: every command and option of ``polypure``, from its argument parser;
* ``reference/config.md``: every config key, from the pydantic models.

What they say is read by :mod:`reference`, which the test of the descriptions shares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mkdocs_gen_files

# mkdocs-gen-files runs this file as a script: its own folder is not on the import path
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference  # noqa: E402

API = Path("reference", "api")


def _api_pages() -> None:
    nav = mkdocs_gen_files.Nav()
    nav["Overview"] = "index.md"
    rows = []
    for module in reference.modules():
        parts = tuple(module.name.split("."))
        doc = Path(*parts, "index.md") if module.package else Path(*parts).with_suffix(".md")
        nav[parts] = doc.as_posix()
        with mkdocs_gen_files.open(API / doc, "w") as page:
            page.write(f"::: {module.name}\n")
        summary = reference.docstring_markdown(module.summary).replace("|", "\\|")
        rows.append(f"| [`{module.name}`]({doc.as_posix()}) | {summary} |")
    with mkdocs_gen_files.open(API / "index.md", "w") as page:
        page.write("\n".join([
            "# API overview",
            "",
            "polypure is organised by role. *Engines* (`polypure.attribution`, the clustering and metrics of "
            "`polypure.evaluation`) compute and know nothing of the store; *stages* (`polypure.pipeline`) read "
            "the store, call an engine and write the store; `polypure.store` alone knows the store's paths "
            "(see [Store schema](../store-schema.md)). A notebook needs only the names `polypure` itself "
            "exports: `Experiment`, `open_results`, `write_report`, `compare_stores`, `load_config` and the "
            "errors.",
            "",
            "Every module below has a page generated from its docstrings when this site was built; the first "
            "line of each module's docstring says what it is for.",
            "",
            "| module | what it is for |",
            "|---|---|",
            *rows,
            "",
            "Style is checked, not only described: `ruff check .` (configured in `pyproject.toml`: pyflakes, "
            "pycodestyle errors, numpy docstrings, pyupgrade, import order, bugbear) runs in CI before the tests, "
            "and a test fails on any import cycle between polypure's modules or any store path spelled outside "
            "the store package.",
            "",
        ]))
    with mkdocs_gen_files.open(API / "SUMMARY.md", "w") as summary:
        summary.writelines(nav.build_literate_nav())


def _reference_pages() -> None:
    with mkdocs_gen_files.open("reference/cli.md", "w") as page:
        page.write(reference.render_cli_page())
    with mkdocs_gen_files.open("reference/config.md", "w") as page:
        page.write(reference.render_config_page())


_api_pages()
_reference_pages()
