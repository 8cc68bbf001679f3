"""mkdocs hook: turn the Sphinx roles in gategrad's docstrings into API links.

Docstrings write ``:func:`gategrad.gate_rejected``` and ``:class:`~gategrad.Gate```; mkdocstrings
renders them as ``:func:<code>gategrad.gate_rejected</code>``. This hook drops the role and
links the name when the API reference documents it (``~`` shows the last component only).
Names it cannot resolve, such as relative ones, stay plain code. Excluded from the site by
``exclude_docs`` in mkdocs.yml.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):<code>(~?)([\w.]+)</code>")


def _link(match: re.Match[str]) -> str:
    tilde, name = match.groups()
    shown = name.rsplit(".", 1)[-1] if tilde else name
    return f'<autoref identifier="{name}" optional><code>{shown}</code></autoref>'


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_link, html)
