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

import dataclasses
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


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        _require(module)
    site = tmp_path / "site"
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
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout}\n{out.stderr}"
    assert (site / "index.html").is_file()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("gategrad.gate_rejected", "gategrad.Gate", "gategrad.backends.numpy"):
        assert name in api, f"the API reference does not document {name}"
