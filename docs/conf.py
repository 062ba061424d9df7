"""Sphinx configuration: the API reference from the docstrings, and the Markdown pages through MyST.

autodoc imports physmdn as the environment provides it (the installed package, or PYTHONPATH=python with a built
extension): the source folder alone has no compiled ``physmdn._C``.
"""

project = "physmdn"
author = "physmdn contributors"
copyright = "physmdn contributors, Apache-2.0"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
