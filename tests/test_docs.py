"""The documentation builds with ``mkdocs build --strict``, and every code block in ``docs/*.md``
and ``README.md`` either runs here or says why it cannot.

Rules for a fenced block (checked below):

- ``python`` blocks run, each in a fresh namespace, one subprocess per page (cwd outside the
  repository, so the installed gategrad is imported, not this checkout's ``gategrad/``, which
  lacks ``backends/``);
- a block preceded by ``<!-- not-run: REASON -->`` is not run; the reason is required;
- in ``docs/``, a block in any other language (bash, toml, yaml, ...) must carry that marker;
  ``text``, ``txt``, ``output`` and blocks without a language are output, not code;
- a ``text`` block titled ``Output`` (```` ```text title="Output" ````) right after a python
  block is that block's expected output: what the block prints must equal it (trailing spaces
  ignored), so printed numbers in the docs cannot drift from what the code gives.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import html as html_lib
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from _backends import run_outside_repo

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]

RUN_LANGS = {"python", "py", "python3"}
OUTPUT_LANGS = {"", "text", "txt", "output", "plain"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_OUTPUT_TITLE = re.compile(r"""title=["']Output["']""")
_NOT_RUN = re.compile(r"<!--\s*not-run\b\s*:?(?P<reason>.*?)-->", re.S)


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason after ``not-run:``; "" when the marker has none
    info: str = ""  # the fence's info string after the language (e.g. title="Output")
    end: int = 0  # 1-based line of the closing fence
    expected: str | None = None  # the expected output, for a python block


def _lang(info: str) -> str:
    info = info.strip().lstrip("{").lstrip(".")
    return re.split(r"[\s{}]", info, maxsplit=1)[0].lower() if info else ""


def _comment_before(lines: list[str], i: int) -> str | None:
    """The HTML comment that ends on the last non-blank line before line ``i``, if any."""
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not lines[j].rstrip().endswith("-->"):
        return None
    k = j
    while k >= 0 and "<!--" not in lines[k]:
        k -= 1
    return "\n".join(lines[k : j + 1]) if k >= 0 else None


def parse_blocks(text: str, page: str) -> list[Block]:
    """Every fenced block of a Markdown page, with its not-run marker."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], m["indent"]
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        comment = _comment_before(lines, i)
        marker = _NOT_RUN.search(comment) if comment else None
        reason = marker["reason"].strip() if marker else None
        info = m["info"].strip()
        block = Block(page, i + 1, _lang(info), "\n".join(body) + "\n", reason, info, j + 1)
        prev = blocks[-1] if blocks else None
        if (
            block.lang == "text"
            and _OUTPUT_TITLE.search(info)
            and prev is not None
            and prev.lang in RUN_LANGS
            and all(not line.strip() for line in lines[prev.end : i])
        ):
            blocks[-1] = dataclasses.replace(prev, expected=block.code)
        blocks.append(block)
        i = j + 1
    return blocks


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _all_blocks() -> list[Block]:
    return [b for p in PAGES for b in parse_blocks(p.read_text(encoding="utf-8"), _rel(p))]


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(
            f"{module} is not installed: the docs checks need the docs tools, "
            "pip install '.[docs]' (or '.[dev]')"
        )


# --------------------------------------------------------------------------------------------
# the parser itself


def test_parser_reads_markers_languages_and_indented_fences() -> None:
    text = (
        "Intro\n\n"
        "<!-- not-run: needs a CUDA GPU -->\n"
        "```python\nimport torch\n```\n\n"
        "```bash title='x'\npip install x\n```\n"
        "<!-- not-run -->\n\n"
        "````python\nprint('````')\n```\nstill inside\n````\n"
        "- item\n\n    ```py\n    x = 1\n    ```\n"
    )
    blocks = parse_blocks(text, "t.md")
    assert [(b.lang, b.not_run, b.line) for b in blocks] == [
        ("python", "needs a CUDA GPU", 4),
        ("bash", None, 8),
        ("python", "", 13),
        ("py", None, 20),
    ]
    assert blocks[2].code == "print('````')\n```\nstill inside\n"
    assert blocks[3].code == "x = 1\n"
    out = parse_blocks('```python\nprint(1)\n```\n\n```text title="Output"\n1\n```\n', "o.md")
    assert out[0].expected == "1\n" and out[1].lang == "text"
    apart = parse_blocks(
        '```python\nprint(1)\n```\nSome prose.\n```text title="Output"\n1\n```\n', "o.md"
    )
    assert apart[0].expected is None


# --------------------------------------------------------------------------------------------
# the rules


def test_docs_exist_and_every_page_is_checked() -> None:
    assert DOCS.is_dir() and (ROOT / "mkdocs.yml").is_file()
    names = {p.name for p in PAGES}
    for page in (
        "index.md",
        "getting-started.md",
        "concepts.md",
        "backends.md",
        "errors.md",
        "api.md",
    ):
        assert page in names, f"docs/{page} is missing"
    runnable = [b for b in _all_blocks() if b.lang in RUN_LANGS and b.not_run is None]
    assert len(runnable) >= 5, "the docs should show (and test) real code"


def test_every_not_run_marker_gives_a_reason() -> None:
    bad = [f"{b.page}:{b.line}" for b in _all_blocks() if b.not_run == ""]
    assert not bad, (
        "these blocks are marked <!-- not-run --> without a reason; write "
        f"<!-- not-run: why it cannot run in the tests -->: {bad}"
    )


def test_every_not_run_marker_belongs_to_a_code_block() -> None:
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        marked = sum(1 for b in parse_blocks(text, _rel(page)) if b.not_run is not None)
        found = len(_NOT_RUN.findall(text))
        assert found == marked, (
            f"{_rel(page)}: {found - marked} not-run marker(s) are not directly above a fenced "
            "code block (only blank lines may stand between them)"
        )


def test_code_that_does_not_run_is_marked_with_a_reason() -> None:
    bad = [
        f"{b.page}:{b.line} ({b.lang})"
        for b in _all_blocks()
        if b.page.startswith("docs/")
        and b.lang not in RUN_LANGS | OUTPUT_LANGS
        and b.not_run is None
    ]
    assert not bad, (
        "every code block in docs/ runs in a test (python) or is marked "
        f"<!-- not-run: REASON --> on the line above: {bad}"
    )


# --------------------------------------------------------------------------------------------
# running the python blocks

_DRIVER = r"""
import contextlib, io, json, sys, traceback
blocks = json.load(open(sys.argv[1], encoding="utf-8"))

def norm(text):
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())

failed = 0
for b in blocks:
    where = f"{b['page']}:{b['line']}"
    # pad so that tracebacks show the line numbers of the Markdown page
    source = "\n" * b["line"] + b["code"]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(source, b["page"], "exec"), {"__name__": "__main__"})
    except BaseException:
        failed += 1
        print(printed.getvalue())
        print(f"FAILED: the python block at {where}", file=sys.stderr)
        traceback.print_exc()
        continue
    if b["expected"] is not None and norm(printed.getvalue()) != norm(b["expected"]):
        failed += 1
        print(f"FAILED: the python block at {where} printed\n{printed.getvalue()}\n"
              f"but the page shows (Output)\n{b['expected']}", file=sys.stderr)
        continue
    print(f"ok: {where}")
    sys.stdout.flush()
sys.exit(1 if failed else 0)
"""


def _runnable_pages() -> list[str]:
    pages = sorted({b.page for b in _all_blocks() if b.lang in RUN_LANGS and b.not_run is None})
    return pages


@pytest.mark.slow
@pytest.mark.parametrize("page", _runnable_pages())
def test_python_blocks_run(page: str, tmp_path: Path) -> None:
    blocks = [
        b.__dict__
        for b in _all_blocks()
        if b.page == page and b.lang in RUN_LANGS and b.not_run is None
    ]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(blocks), encoding="utf-8")
    driver = tmp_path / "run_blocks.py"
    driver.write_text(_DRIVER, encoding="utf-8")
    out = run_outside_repo([str(driver), str(spec)], tmp_path)
    assert out.returncode == 0, f"{page}:\n{out.stdout}\n{out.stderr[-8000:]}"


# --------------------------------------------------------------------------------------------
# the site


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once per session with ``mkdocs build --strict`` (any warning fails)."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        _require(module)
    tmp = tmp_path_factory.mktemp("docs")
    site = tmp / "site"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",  # (no -q: it would hide the warnings that --strict counts)
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout}\n{out.stderr}"
    return site


@pytest.mark.slow
def test_mkdocs_build_strict(site: Path) -> None:
    assert (site / "index.html").is_file()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in (
        "gategrad.gate_rejected",
        "gategrad.Gate",
        "gategrad.backends.numpy",
        "gategrad.integrations.mlx_lm_lora.train_dpo",
    ):
        assert name in api, f"the API reference does not document {name}"


# --------------------------------------------------------------------------------------------
# the rendered site: what mkdocstrings and Markdown made of the pages
#
# Each checker takes a page's HTML and returns what is wrong (empty when nothing is); the
# tests below run them on the built site, and test_site_checkers_catch_planted_faults on
# crafted HTML, so that a checker that never fires cannot pass unnoticed.

#: The code column, in characters: docs/assets/extra.css sizes the code font so that 88
#: monospace characters fit the 688 px content column (at 1280 px), and mkdocs.yml asks
#: mkdocstrings to format signatures to the same width (line_length).
CODE_COLUMN = 88

_PRE = re.compile(r"<pre\b.*?</pre>", re.S)
_TAGS = re.compile(r"<[^>]+>")
_SECTION = re.compile(
    r'<span class="doc-section-title">(?P<title>[\w ]+):</span>\s*</p>\s*'
    r"(?P<body><table>.*?</table>|<ul>.*?</ul>)",
    re.S,
)
_ITEM = re.compile(r'<tr class="doc-section-item">(.*?)</tr>|<li\b.*?</li>', re.S)
_SIGNATURE = re.compile(r'<div class="[^"]*\bdoc-signature\b[^"]*">\s*(<pre\b.*?</pre>)', re.S)
# a highlighted block: <div class="language-python highlight"><pre>...</pre>
_BLOCK = re.compile(
    r'<div class="(?P<cls>[^"]*\bhighlight\b[^"]*)"[^>]*>\s*(?P<pre><pre\b.*?</pre>)', re.S
)


def _plain(fragment: str) -> str:
    return html_lib.unescape(_TAGS.sub("", fragment))


def _prose(page: str) -> str:
    """The page's HTML without its code blocks."""
    return _PRE.sub("", page)


def _context(text: str, start: int, end: int) -> str:
    fragment = re.sub(r"^[^<]*>|<[^>]*$", "", text[max(0, start - 80) : end + 80])
    return " ".join(_plain(fragment).split())


def rest_table_rules(page: str) -> list[str]:
    """Rows of ``=====`` outside code blocks: reST simple tables rendered as paragraphs."""
    prose = _prose(page)
    return [_context(prose, m.start(), m.end()) for m in re.finditer(r"={5,}", prose)]


def lone_double_colons(page: str) -> list[str]:
    """Paragraphs that are ``::`` or end in `` ::``: reST literal-block markers."""
    prose = _prose(page)
    found = re.finditer(r"<p>\s*::\s*</p>|\s::\s*</p>", prose)
    return [_context(prose, m.start(), m.end()) for m in found]


def rest_inline_literals(page: str) -> list[str]:
    """Double backticks left in the text (reST ``literal``), outside code blocks."""
    prose = _prose(page)
    return [_context(prose, m.start(), m.end()) for m in re.finditer(r"``[^`]*``", prose)]


def returns_with_more_than_one_entry(page: str) -> list[str]:
    """Returns sections with other than one entry (a description split into rows)."""
    bad = []
    for m in _SECTION.finditer(page):
        if m["title"] == "Returns":
            items = _ITEM.findall(m["body"])
            if len(items) != 1:
                bad.append(f"{len(items)} entries: {_context(page, m.start(), m.end())[:300]}")
    return bad


def _defaults(signature_html: str) -> set[str]:
    """The parameters that have a default in a rendered signature."""
    text = _plain(signature_html).strip()
    source = "def f" + text[text.index("(") :] + ": pass"
    try:
        args = ast.parse(source).body[0].args  # type: ignore[attr-defined]
    except SyntaxError as err:
        raise AssertionError(f"cannot parse the rendered signature {text!r}: {err}") from err
    positional = [*args.posonlyargs, *args.args]
    named = positional[len(positional) - len(args.defaults) :]
    named += [a for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
    return {a.arg for a in named}


def parameter_faults(page: str) -> list[str]:
    """Parameters rows that name several parameters (``a, b``: griffe cannot match them to
    the signature, so they show no type and "required") or that say "required" for a
    parameter whose signature (the nearest one above the section) gives it a default."""
    bad = []
    signatures = [(m.start(), m.group(1)) for m in _SIGNATURE.finditer(page)]
    for m in _SECTION.finditer(page):
        if m["title"] != "Parameters":
            continue
        above = [sig for start, sig in signatures if start < m.start()]
        defaults = _defaults(above[-1]) if above else set()
        for row in re.findall(r'<tr class="doc-section-item">(.*?)</tr>', m["body"], re.S):
            cells = re.findall(r"<td>(.*?)</td>", row, re.S)
            name = _plain(cells[0]).strip()
            if not re.fullmatch(r"\*{0,2}\w+", name):
                bad.append(f"grouped parameters {name!r}")
            elif "required" in _plain(cells[-1]) and name in defaults:
                bad.append(f"{name!r} is shown as required but has a default")
    return bad


def long_code_lines(page: str, width: int = CODE_COLUMN) -> list[str]:
    """Lines of code blocks (signatures included) longer than the column. Output blocks
    (``text``) wrap (docs/assets/extra.css) and are not counted."""
    bad = []
    for m in _BLOCK.finditer(page):
        if "language-text" in m["cls"].split():
            continue
        for line in _plain(m["pre"]).splitlines():
            if len(line) > width:
                bad.append(f"{len(line)} > {width}: {line}")
    return bad


_API_HEADING = re.compile(r'<h([1-6]) id="([\w.]+)" class="doc doc-heading">(.*?)</h\1>', re.S)
_NOT_PROSE = re.compile(
    r"<pre\b.*?</pre>|<a\b.*?</a>|<h([1-6])\b.*?</h\1>"
    r'|<tr class="doc-section-item">\s*<td>.*?</td>',
    re.S,
)


def unlinked_api_names(page: str) -> list[str]:
    """Inline code that is the bare name of a function or class documented on the page (with
    one shortest path) but is not a link to it (docs/hooks.py links those)."""
    depths: dict[str, list[int]] = {}
    for m in _API_HEADING.finditer(page):
        if re.search(r"doc-symbol-(?:function|class)\b", m.group(3)):
            depths.setdefault(m.group(2).rsplit(".", 1)[-1], []).append(m.group(2).count("."))
    names = {n for n, found in depths.items() if found.count(min(found)) == 1}
    found = re.findall(r"<code>([A-Za-z_]\w*)(?:\([^<]*\))?</code>", _NOT_PROSE.sub("", page))
    return sorted({f for f in found if f in names})


SITE_CHECKS = {
    "reST table rules": rest_table_rules,
    "reST '::' paragraphs": lone_double_colons,
    "reST ``literals``": rest_inline_literals,
    "Returns sections with more than one entry": returns_with_more_than_one_entry,
    "parameters shown wrongly": parameter_faults,
    "API names left as plain code": unlinked_api_names,
}


def _pages(site: Path) -> dict[str, str]:
    return {
        str(p.relative_to(site)): p.read_text(encoding="utf-8")
        for p in sorted(site.rglob("*.html"))
        if p.name == "index.html" and "assets" not in p.parts
    }


@pytest.mark.slow
@pytest.mark.parametrize("check", SITE_CHECKS, ids=lambda name: name.replace(" ", "_"))
def test_rendered_api_reference(site: Path, check: str) -> None:
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert _SECTION.search(api), "no docstring sections found: has mkdocstrings' HTML changed?"
    assert _SIGNATURE.search(api), "no signatures found: has mkdocstrings' HTML changed?"
    found = SITE_CHECKS[check](api)
    assert not found, f"the API page has {check}:\n" + "\n".join(found[:20])


@pytest.mark.slow
def test_rendered_code_fits_the_column(site: Path) -> None:
    pages = _pages(site)
    assert "api/index.html" in pages and "integrations/index.html" in pages
    found = [f"{name}: {line}" for name, page in pages.items() for line in long_code_lines(page)]
    assert not found, (
        f"code lines wider than the {CODE_COLUMN}-character column (they scroll and hide "
        "arguments; wrap them):\n" + "\n".join(found[:40])
    )


_GOOD_PAGE = """
<h2 id="gategrad.f">f</h2>
<div class="language-python doc-signature highlight"><pre><span></span><code>f(
    a: int,
    b: <span>Array</span> | None = None,
    *,
    c: str = &quot;x&quot;,
) -&gt; tuple[int, int]
</code></pre></div>
<p><span class="doc-section-title">Parameters:</span></p>
<table><tbody>
<tr class="doc-section-item"><td><code>a</code></td><td>int</td><td>a</td>
<td><em>required</em></td></tr>
<tr class="doc-section-item"><td><code>b</code></td><td>Array</td><td>b</td>
<td><code>None</code></td></tr>
</tbody></table>
<p><span class="doc-section-title">Returns:</span></p>
<table><tbody>
<tr class="doc-section-item"><td>tuple</td><td><p>the pair; a long description that wraps
over two lines</p></td></tr>
</tbody></table>
<div class="language-text highlight"><pre><code>{long_output}</code></pre></div>
<div class="language-python highlight"><pre><code>x = 1  # ====== in code is fine ::
</code></pre></div>
"""


def test_site_checkers_catch_planted_faults() -> None:
    good = _GOOD_PAGE.format(long_output="o" * 200)  # output blocks wrap: not counted
    for name, check in {**SITE_CHECKS, "long code lines": long_code_lines}.items():
        assert check(good) == [], (name, check(good))
    planted = {
        rest_table_rules: "<p>name ===== value ===== </p>",
        lone_double_colons: "<p>For example ::</p>",
        rest_inline_literals: "<td><code>``(loss, metrics)``</code></td>",
        returns_with_more_than_one_entry: _GOOD_PAGE.replace(
            "over two lines</p></td></tr>",
            'over</p></td></tr><tr class="doc-section-item"><td>two</td><td>lines</td></tr>',
        ),
        long_code_lines: _GOOD_PAGE.replace("x = 1", "x = " + "1 + " * 30 + "1"),
    }
    for check, page in planted.items():
        assert check(page.format(long_output="o")), f"{check.__name__} missed its fault"
    heading = (
        '<h2 id="gategrad.f" class="doc doc-heading">'
        '<code class="doc-symbol doc-symbol-heading doc-symbol-function"></code> f</h2>'
    )
    assert unlinked_api_names(heading + '<p><a href="#gategrad.f"><code>f</code></a></p>') == []
    assert unlinked_api_names(heading + "<p>see <code>f(x)</code></p>") == ["f"]
    grouped = _GOOD_PAGE.replace("<code>b</code>", "<code>b, c</code>")
    assert parameter_faults(grouped) == ["grouped parameters 'b, c'"]
    required = _GOOD_PAGE.replace("<td><code>None</code></td>", "<td><em>required</em></td>")
    assert parameter_faults(required) == ["'b' is shown as required but has a default"]
    signature = _SIGNATURE.search(_GOOD_PAGE)
    assert signature is not None and _defaults(signature.group(1)) == {"b", "c"}
    # signatures are code blocks too
    narrow = long_code_lines(_GOOD_PAGE.format(long_output="o"), width=20)
    assert any("b: Array | None = None," in line for line in narrow), narrow


# --------------------------------------------------------------------------------------------
# excerpts: a block that is not run because a script in examples/ is its runnable version uses
# only names that script defines (the excerpt cannot drift into undefined names)

_EXAMPLE = re.compile(r"examples/(\w+\.py)")


def _bound_and_loaded(tree: ast.AST) -> tuple[set[str], set[str]]:
    bound: set[str] = set()
    loaded: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return bound, loaded


def undefined_names(snippet: str, script: str) -> list[str]:
    """Names the snippet uses that neither it, the script nor Python's builtins define."""
    bound, loaded = _bound_and_loaded(ast.parse(snippet))
    defined, _ = _bound_and_loaded(ast.parse(script))
    return sorted(loaded - bound - defined - set(dir(builtins)))


def _excerpts() -> list[Block]:
    return [b for b in _all_blocks() if b.lang in RUN_LANGS and _EXAMPLE.search(b.not_run or "")]


def test_excerpts_use_only_names_their_example_defines() -> None:
    excerpts = _excerpts()
    assert any("trl_dpo_gated.py" in (b.not_run or "") for b in excerpts), "no TRL excerpt found"
    for block in excerpts:
        name = _EXAMPLE.search(block.not_run or "")[1]  # type: ignore[index]
        script = ROOT / "examples" / name
        assert script.is_file(), (
            f"{block.page}:{block.line} names examples/{name}, which is missing"
        )
        missing = undefined_names(block.code, script.read_text(encoding="utf-8"))
        assert not missing, (
            f"{block.page}:{block.line}: the excerpt of examples/{name} uses {missing}, "
            "which the example does not define"
        )


def test_undefined_names_checker_catches_a_planted_name() -> None:
    script = "import torch\npolicy = make()\ndef make():\n    return 1\n"
    assert undefined_names("out = policy(torch.ones(2))\nprint(out)\n", script) == []
    assert undefined_names("trainer = DPOTrainer(model=policy, args=cfg)\n", script) == [
        "DPOTrainer",
        "cfg",
    ]
