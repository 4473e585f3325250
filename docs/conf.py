"""Sphinx configuration of the documentation site (``nox -s docs``).

The pages are the Markdown files of this directory, read by MyST; the API reference comes from
the package's docstrings (autodoc). The build needs no network: no intersphinx inventories, and
the diagrams are SVG files committed beside their Mermaid sources (``diagrams/``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import sqlalchemy_writethrough

project = "sqlalchemy-writethrough"
author = "the sqlalchemy-writethrough authors"
copyright = "2026, the sqlalchemy-writethrough authors"
release = sqlalchemy_writethrough.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "diagrams/*.md", "**/.ipynb_checkpoints"]

# MyST: GitHub-style heading anchors, so links such as ``usage.md#keys`` work on GitHub and
# in the site alike.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist", "attrs_inline"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "furo"
html_title = f"sqlalchemy-writethrough {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
pygments_style = "friendly"
pygments_dark_style = "monokai"

# Links from a page to a file of the repository outside docs/ (``../benchmarks/results/latest.md``,
# ``../examples/flask_app/app.py``) work on GitHub as they are. In the site, Sphinx cannot hold
# such a file as a page: MyST's ``path:`` scheme makes it a download of the file instead.
_DOCS = Path(__file__).resolve().parent
_REPO_LINK = re.compile(r"\]\((\.\./[^)#\s]+)\)")
_IMAGES = {".png", ".svg", ".jpg", ".jpeg", ".gif"}  # Sphinx copies images from anywhere


def _link_repository_files(app: Any, docname: str, source: list[str]) -> None:
    here = (_DOCS / docname).parent

    def rewrite(match: re.Match[str]) -> str:
        target = (here / match.group(1)).resolve()
        if _DOCS in target.parents or not target.exists() or target.suffix in _IMAGES:
            return match.group(0)  # a page, a broken link (Sphinx reports it), or an image
        return f"](path:{match.group(1)})"

    source[0] = _REPO_LINK.sub(rewrite, source[0])


def setup(app: Any) -> None:
    app.connect("source-read", _link_repository_files)
