"""mkdocs hook: link the API names in inline code, and refuse reST leftovers.

- Inline code that names a documented object by its full path (``gategrad.gate_rejected``,
  also as a call, ``gategrad.attach(loss_fn, gate)``) links to its API entry, on every page
  (headings, code blocks and existing links are left alone). Names the API reference does not
  document stay plain code. Docstrings write explicit cross-references instead
  (``[`preference_loss`][]``, resolved in the docstring's scope).
- On the API page, inline code that is the bare name of a function or class documented on
  that page (``preference_loss``, ``scale_grad(x, w)``) links to it too, when the name is
  unambiguous (methods and attributes are not linked by bare name).
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


# an API heading: <h3 id="gategrad.scale_grad" class="doc doc-heading"> ... doc-symbol-function
_HEADING = re.compile(r'<h([1-6]) id="([\w.]+)" class="doc doc-heading">(.*?)</h\1>', re.S)
_BARE = re.compile(r"<code>([A-Za-z_]\w*)(\([^<]*\))?</code>")
# also left alone on the API page: the name column of parameter and attribute tables
_NAME_CELL = re.compile(r'<tr class="doc-section-item">\s*<td>.*?</td>', re.S)


def _bare_targets(html: str) -> dict[str, str]:
    """Bare name -> id of the functions and classes documented on a page (unambiguous ones)."""
    ids: dict[str, list[str]] = {}
    for m in _HEADING.finditer(html):
        if re.search(r"doc-symbol-(?:function|class)\b", m.group(3)):
            ids.setdefault(m.group(2).rsplit(".", 1)[-1], []).append(m.group(2))
    targets = {}
    for name, found in ids.items():
        shortest = min(found, key=lambda i: i.count("."))
        if sum(i.count(".") == shortest.count(".") for i in found) == 1:
            targets[name] = shortest  # a re-export documented twice: its shortest path
    return targets


def _link_bare(html: str, targets: dict[str, str]) -> str:
    def link(match: re.Match[str]) -> str:
        target = targets.get(match.group(1))
        if target is None:
            return match.group(0)
        return f'<autoref identifier="{target}" optional>{match.group(0)}</autoref>'

    parts: list[str] = []
    last = 0
    skip = re.compile(f"{_SKIP.pattern}|{_NAME_CELL.pattern}", re.S)
    for region in skip.finditer(html):
        parts.append(_BARE.sub(link, html[last : region.start()]))
        parts.append(region.group(0))
        last = region.end()
    parts.append(_BARE.sub(link, html[last:]))
    return "".join(parts)


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
    html = "".join(parts)
    if page.file.src_uri == "api.md":
        html = _link_bare(html, _bare_targets(html))
    return html
