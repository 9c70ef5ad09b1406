"""Sphinx configuration of fal_magic's documentation (MyST Markdown; the API reference comes from the
docstrings). Built by .ci/run with warnings as errors: ``sphinx-build -W -b html docs docs/_build``."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

project = "fal_magic"
author = "the fal_magic developers"
copyright = "2026, the fal_magic developers"

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True}

html_theme = "alabaster"
html_title = "fal_magic"
