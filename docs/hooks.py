"""mkdocs hook: link the API names in inline code, and refuse reST leftovers.

- Inline code that names a documented object by its full path (``gategrad.gate_rejected``,
  also as a call, ``gategrad.attach(loss_fn, gate)``) links to its API entry, on every page
  (headings, code blocks and existing links are left alone). Names the API reference does not
  document stay plain code. Docstrings write explicit cross-references instead
  (``[`preference_loss`][]``, resolved in the docstring's scope).
- reStructuredText that Markdown renders as text (Sphinx roles such as ``:func:``, simple-table
  rules ``=====``, a ``::`` paragraph) is a warning, so ``mkdocs build --strict`` fails on it.
  tests/test_docs.py checks the built pages in more detail.

Excluded from the site by ``exclude_docs`` in mkdocs.yml.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("mkdocs.hooks.gategrad")

# inline code naming gategrad.x.y, optionally called: <code>gategrad.attach(loss_fn, gate)</code>
_CODE = re.compile(r"<code>((?:gategrad|backends)(?:\.\w+)+)(\([^<]*\))?</code>")
# regions whose code is not linked: code blocks, links, headings, autorefs already made
_SKIP = re.compile(
    r"<pre\b.*?</pre>|<a\b.*?</a>|<h([1-6])\b.*?</h\1>|<autoref\b.*?</autoref>", re.S
)
_LEFTOVERS = {
    "a Sphinx role (write a cross-reference, [`name`][] or [`name`][full.path])": re.compile(
        r":(?:func|class|meth|mod|data|attr|exc|obj):(?:<code>|`)"
    ),
    "a reST simple-table rule (write a Markdown table)": re.compile(r"<p>[^<]*={5,}"),
    "a reST '::' literal marker (write a fenced code block)": re.compile(r"(?:<p>|\s)::</p>"),
}


def _link(match: re.Match[str]) -> str:
    name, call = match.group(1), match.group(2) or ""
    return f'<autoref identifier="{name}" optional><code>{name}{call}</code></autoref>'


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    for what, pattern in _LEFTOVERS.items():
        for found in pattern.finditer(html):
            start = max(0, found.start() - 60)
            context = re.sub(r"<[^>]+>", "", html[start : found.end() + 60])
            log.warning("%s: %s: %r", page.file.src_uri, what, context.strip())
    parts: list[str] = []
    last = 0
    for skip in _SKIP.finditer(html):
        parts.append(_CODE.sub(_link, html[last : skip.start()]))
        parts.append(skip.group(0))
        last = skip.end()
    parts.append(_CODE.sub(_link, html[last:]))
    return "".join(parts)
