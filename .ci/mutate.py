#!/usr/bin/env python
"""Sampled AST mutation testing of gategrad's core spec (see CONTRIBUTING.md, "Mutation testing").

Each mutant changes one node of one module; the module's targeted tests then run on a temporary
copy of the repository, from the copy's root, so the copy's ``gategrad/`` and ``backends/``
shadow any installed gategrad (``gategrad/_source_tree.py`` maps the copy's ``backends/`` to
``gategrad.backends``, the ``package-dir`` layout). A mutant is

| outcome | meaning |
|---|---|
| killed | a test failed (pytest ``-x`` stops at the first) |
| timeout | the run passed the per-mutant limit; counts as killed |
| survived | every selected test passed |
| equivalent | survived, and listed in ``.ci/mutants-equivalent.txt`` with the reason |

Score: ``(killed + timeout) / (mutants - equivalent)``.

Operators (``--operators``): ``cmp`` (negated and boundary-shifted comparisons), ``arith``
(swapped arithmetic, dropped unary minus), ``const`` (changed numeric constants), ``bool``
(negated conditions, ``and``/``or`` swapped, ``True``/``False``, dropped ``not``), ``stmt``
(removed ``raise``, calls and re-assignments), ``default`` (changed default arguments).

Usage::

    nice -n 10 python .ci/mutate.py --sample 200 --seed 1 --jobs 2 --out mutants.json
    python .ci/mutate.py --list                  # count the candidate mutants, run nothing
    python .ci/mutate.py --modules gategrad/_math.py --sample 20
    python .ci/mutate.py --rerun mutants.json --tests tests/test_new.py  # do new tests kill them?

Not mutated: docstrings, strings and f-strings, annotations, imports, ``assert`` (type
narrowing), statements marked ``pragma: no cover``, and the benchmark/lab tooling of the
backends (:data:`TOOLING`: compile options, optimizers, memory probes, device queries), which the
benchmark and lab suites test, not the core spec.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / ".ci" / "mutants-equivalent.txt"

#: The tests each module's mutants run, the most likely (and quickest) killers first. A
#: ``--deselect`` entry leaves out a slow test that cannot see the module's mutants alone.
_NO_COMPILE = [
    "--deselect=tests/test_gate_rejected.py::test_vjp_under_torch_compile",
    "--deselect=tests/test_gate_rejected.py::test_vjp_under_mx_compile",
]
#: Every module's mutants also run the trust and fuzz suites (bad input, traced contracts).
_TRUST = ["tests/test_trust.py", "tests/test_fuzz.py"]
_GATE = [
    "tests/test_spec_mutants.py",
    "tests/test_spec_edges.py",
    "tests/test_gate.py",
    "tests/test_gate_rejected.py",
    "tests/test_losses.py",
    "tests/test_errors.py",
    *_TRUST,
    *_NO_COMPILE,
]
_LOSSES = [
    "tests/test_losses.py",
    "tests/test_spec_mutants.py",
    "tests/test_spec_edges.py",
    "tests/test_errors.py",
    *_TRUST,
]
_BACKEND = [
    "tests/test_spec_mutants.py",
    "tests/test_backend_edges.py",
    "tests/test_gate.py",
    "tests/test_gate_rejected.py",
    "tests/test_token_logps.py",
    "tests/test_fused.py",
    "tests/test_losses.py",
    "tests/test_dispatch.py",
    "tests/test_kit.py",
    "tests/test_conformance_softmax.py",
    "tests/test_backend_tooling.py",
    "tests/test_errors.py",
    *_TRUST,
]
_CORE_K = ["-k", "not jax and not mlx"]  # backend-neutral code: NumPy and eager torch see it


def _only(fw: str) -> list[str]:
    """Tests of framework ``fw`` and the framework-neutral ones (ids name no framework)."""
    return ["-k", f"{fw} or not (numpy or torch or jax or mlx)"]


TESTS: dict[str, list[str]] = {
    "gategrad/_gate.py": _GATE,
    "gategrad/_math.py": _GATE,
    "gategrad/_core.py": [*_GATE, "tests/test_backend_edges.py", "tests/test_torch_hook.py"],
    "gategrad/losses.py": _LOSSES,
    "gategrad/_loss_registry.py": _LOSSES,
    "gategrad/_logps.py": [
        "tests/test_token_logps.py",
        "tests/test_spec_mutants.py",
        "tests/test_errors.py",
        "tests/test_lab_metrics.py",
        "tests/test_backend_edges.py",
        *_TRUST,
    ],
    "backends/numpy.py": [*_BACKEND, *_NO_COMPILE, *_only("numpy")],
    "backends/torch.py": [
        *_BACKEND,
        "tests/test_torch_kernels.py",
        "tests/test_torch_hook.py",
        _NO_COMPILE[1],
        *_only("torch"),
    ],
    "backends/jax.py": [*_BACKEND, "tests/test_jax_optax.py", *_NO_COMPILE, *_only("jax")],
    "backends/mlx.py": [*_BACKEND, _NO_COMPILE[0], *_only("mlx")],
}
for _path in ("gategrad/_gate.py", "gategrad/_math.py", "gategrad/_core.py", "gategrad/_logps.py"):
    TESTS[_path] = [*TESTS[_path], *_CORE_K]
for _path in ("gategrad/losses.py", "gategrad/_loss_registry.py"):
    TESTS[_path] = [*TESTS[_path], *_CORE_K]
DEFAULT_MODULES = list(TESTS)

#: Backend functions and classes that are benchmark/lab tooling, not the core spec.
TOOLING = {
    "_AdamW",
    "adamw",
    "_compile",
    "_peak_memory",
    "_profiler_peak",
    "describe",
    "default_device_is_gpu",
    "device_like",
    "set_threads",
    "evaluate",
}

OPERATORS = ("cmp", "arith", "const", "bool", "stmt", "default")

_CMP_NEGATE: dict[type, type] = {
    ast.Lt: ast.GtE,
    ast.LtE: ast.Gt,
    ast.Gt: ast.LtE,
    ast.GtE: ast.Lt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_CMP_BOUNDARY: dict[type, type] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
}
_ARITH: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
}


@dataclasses.dataclass
class Mutant:
    path: str
    line: int
    col: int
    end_line: int
    end_col: int
    op: str
    original: str
    replacement: str
    outcome: str = ""
    seconds: float = 0.0
    detail: str = ""

    @property
    def key(self) -> str:
        return (
            f"{self.path}:{self.line}:{self.col} {self.op} "
            f"`{_short(self.original)}` -> `{_short(self.replacement)}`"
        )


_FIELDS = {f.name for f in dataclasses.fields(Mutant)}


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


class _Finder(ast.NodeVisitor):
    """Collects the mutants of one module."""

    def __init__(self, path: str, source: str, operators: set[str]) -> None:
        self.path = path
        self.source = source
        self.lines = source.splitlines(keepends=True)
        self.ops = operators
        self.out: list[Mutant] = []
        self.defaults: set[int] = set()

    # -- helpers --------------------------------------------------------------------------------
    def _add(self, node: ast.AST, op: str, new: ast.AST | str, wrap: bool = True) -> None:
        if op not in self.ops:
            return
        text = new if isinstance(new, str) else ast.unparse(new)
        if wrap and not isinstance(node, ast.stmt):
            text = f"({text})"
        orig = ast.get_source_segment(self.source, node) or ast.unparse(node)
        self.out.append(
            Mutant(
                self.path,
                node.lineno,
                node.col_offset,
                node.end_lineno or node.lineno,
                node.end_col_offset or 0,
                op,
                orig,
                text,
            )
        )

    def _skip_stmt(self, node: ast.stmt) -> bool:
        return "pragma: no cover" in self.lines[node.lineno - 1]

    # -- structure ------------------------------------------------------------------------------
    def generic_visit(self, node: ast.AST) -> None:
        if isinstance(node, ast.stmt) and self._skip_stmt(node):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Assert, ast.JoinedStr)):
            return
        for field, value in ast.iter_fields(node):
            if field in ("annotation", "returns", "decorator_list", "type_comment"):
                continue
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, ast.AST):
                    self.visit(item)

    def _visit_body(self, body: list[ast.stmt]) -> None:
        for i, stmt in enumerate(body):
            if (
                i == 0
                and isinstance(stmt, ast.Expr)
                and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            ):
                continue  # docstring
            self.visit(stmt)

    def visit_Module(self, node: ast.Module) -> None:
        self._visit_body(node.body)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if node.name in TOOLING or self._skip_stmt(node):
            return
        for base in node.bases:
            self.visit(base)
        self._visit_body(node.body)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if node.name in TOOLING or self._skip_stmt(node):
            return
        args = node.args
        for d in [*args.defaults, *args.kw_defaults]:
            if d is not None:
                self._default(d)
        self._visit_body(node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None and not self._skip_stmt(node):
            self.visit(node.value)

    # -- operators ------------------------------------------------------------------------------
    def _default(self, d: ast.expr) -> None:
        if isinstance(d, ast.Constant) and not isinstance(d.value, str) and d.value is not None:
            for new in _const_variants(d.value):
                self._add(d, "default", ast.Constant(new), wrap=False)
        elif (
            isinstance(d, ast.UnaryOp)
            and isinstance(d.op, ast.USub)
            and isinstance(d.operand, ast.Constant)
        ):
            self._add(d, "default", ast.Constant(-d.operand.value + 1), wrap=False)
        elif isinstance(d, ast.Constant) and d.value is None:
            return
        else:
            self.visit(d)

    def visit_Compare(self, node: ast.Compare) -> None:
        for i, op in enumerate(node.ops):
            for table, _name in ((_CMP_NEGATE, "negate"), (_CMP_BOUNDARY, "boundary")):
                if type(op) in table:
                    new = copy.deepcopy(node)
                    new.ops[i] = table[type(op)]()
                    self._add(node, "cmp", new)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if type(node.op) in _ARITH:
            new = copy.deepcopy(node)
            new.op = _ARITH[type(node.op)]()
            self._add(node, "arith", new)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if self._skip_stmt(node):
            return
        if type(node.op) in _ARITH:
            new = copy.deepcopy(node)
            new.op = _ARITH[type(node.op)]()
            self._add(node, "arith", new)
        self._add(node, "stmt", "pass")
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            for new in _const_variants(-node.operand.value):
                self._add(node, "const", ast.Constant(new))
            return
        if isinstance(node.op, ast.USub):
            self._add(node, "arith", node.operand)
        elif isinstance(node.op, ast.Not):
            self._add(node, "bool", node.operand)
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self._add(node, "bool", new)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, (str, bytes)) or node.value is None or node.value is ...:
            return
        for new in _const_variants(node.value):
            self._add(node, "const", ast.Constant(new))

    def _negate_test(self, test: ast.expr) -> None:
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            return  # dropping the `not` is the same mutant
        if isinstance(test, ast.Compare) and len(test.ops) == 1:
            return  # the negated comparison is the same mutant
        self._add(test, "bool", ast.UnaryOp(ast.Not(), copy.deepcopy(test)))

    def visit_If(self, node: ast.If) -> None:
        if self._skip_stmt(node):
            return
        self._negate_test(node.test)
        self.generic_visit(node)

    def visit_While(self, node: ast.While) -> None:
        self._negate_test(node.test)
        self.generic_visit(node)

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self._negate_test(node.test)
        self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> None:
        if not self._skip_stmt(node):
            self._add(node, "stmt", "pass")

    def visit_Expr(self, node: ast.Expr) -> None:
        if self._skip_stmt(node):
            return
        if isinstance(node.value, ast.Call):
            self._add(node, "stmt", "pass")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if self._skip_stmt(node):
            return
        targets = {t.id for t in node.targets if isinstance(t, ast.Name)}
        used = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
        if targets & used:  # x = f(x): removing it skips a transformation
            self._add(node, "stmt", "pass")
        self.generic_visit(node)


def _const_variants(value: object) -> list[object]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1] if value != 0 else [1]
    if isinstance(value, float):
        return [1.0] if value == 0.0 else [value * 2.0]
    return []


def find_mutants(path: str, operators: set[str]) -> list[Mutant]:
    """Every mutant of ``path`` that parses and differs from the original's AST."""
    source = (ROOT / path).read_text()
    finder = _Finder(path, source, operators)
    finder.visit(ast.parse(source))
    original = ast.dump(ast.parse(source))
    out = []
    for m in finder.out:
        try:
            tree = ast.parse(apply(source, m))
        except SyntaxError:
            continue
        if ast.dump(tree) != original:
            out.append(m)
    return out


def apply(source: str, m: Mutant) -> str:
    """``source`` with ``m``'s node replaced (AST offsets are UTF-8 byte offsets)."""
    lines = source.splitlines(keepends=True)
    start = sum(len(line.encode()) for line in lines[: m.line - 1]) + m.col
    end = sum(len(line.encode()) for line in lines[: m.end_line - 1]) + m.end_col
    data = source.encode()
    return (data[:start] + m.replacement.encode() + data[end:]).decode()


def load_equivalent() -> dict[str, str]:
    out: dict[str, str] = {}
    if EQUIVALENT_FILE.exists():
        for line in EQUIVALENT_FILE.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, reason = line.partition(" ## ")
                out[key.strip()] = reason.strip()
    return out


def _copy_repo(dest: Path) -> None:
    ignore = shutil.ignore_patterns(
        ".git", "__pycache__", "*.pyc", ".venv", "site", "build", "dist", "*.egg-info",
        ".hypothesis", ".pytest_cache", ".mypy_cache", ".ruff_cache", "lab-out",
    )  # fmt: skip
    shutil.copytree(ROOT, dest, ignore=ignore)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONDONTWRITEBYTECODE="1",  # a mutant never reuses a stale .pyc
        HYPOTHESIS_PROFILE="dev",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
    )
    env.pop("PYTHONPATH", None)
    return env


def run_tests(
    workdir: Path, tests: list[str], timeout: float, seed: int, extra: list[str]
) -> tuple[str, float, str]:
    """``('pass' | 'fail' | 'timeout', seconds, tail of the output)``."""
    tests = [t for t in tests if not t.startswith("tests/") or (workdir / t).exists()]
    cmd = [
        sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
        "--hypothesis-seed", str(seed), "-m", "not slow", *extra, *tests,
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "timeout", time.monotonic() - start, out[-2000:]
    seconds = time.monotonic() - start
    return ("pass" if proc.returncode == 0 else "fail"), seconds, out[-2000:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--modules", nargs="+", default=DEFAULT_MODULES, help="paths to mutate")
    ap.add_argument("--operators", nargs="+", default=list(OPERATORS), choices=OPERATORS)
    ap.add_argument("--sample", type=int, default=0, help="mutants to draw (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run in parallel")
    ap.add_argument("--hypothesis-seed", type=int, default=0, help="for reproducible kills")
    ap.add_argument(
        "--timeout-factor",
        type=float,
        default=3.0,
        help="per-mutant limit: factor * the unmutated run's time + 30 s (a hang is a kill)",
    )
    ap.add_argument(
        "--limit",
        type=float,
        help="fixed per-mutant limit in seconds; skips the unmutated baseline runs",
    )
    ap.add_argument("--list", action="store_true", help="count the mutants and exit")
    ap.add_argument(
        "--rerun",
        type=Path,
        help="run only the mutants an earlier --out file lists as survived (same source lines)",
    )
    ap.add_argument(
        "--tests",
        nargs="+",
        help="run these tests for every mutant instead of the module's TESTS selection",
    )
    ap.add_argument("--out", type=Path, help="write every mutant's outcome as JSON")
    ap.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[], help="passed on")
    args = ap.parse_args(argv)

    ops = set(args.operators)
    for path in args.modules:
        if path not in TESTS:
            ap.error(f"no test selection for {path}; add it to TESTS in .ci/mutate.py")
    everything = [m for path in args.modules for m in find_mutants(path, ops)]
    by_module = Counter(m.path for m in everything)
    by_op = Counter(m.op for m in everything)
    print(f"{len(everything)} candidate mutants", flush=True)
    print("  by module: " + ", ".join(f"{k} {v}" for k, v in sorted(by_module.items())))
    print("  by operator: " + ", ".join(f"{k} {v}" for k, v in sorted(by_op.items())))
    if args.list:
        return 0
    chosen = everything
    if args.rerun:
        wanted = {
            Mutant(**{k: v for k, v in d.items() if k in _FIELDS}).key
            for d in json.loads(args.rerun.read_text())
            if d["outcome"] == "survived"
        }
        chosen = [m for m in everything if m.key in wanted]
        missing = len(wanted) - len(chosen)
        print(f"--rerun: {len(chosen)} survivors found, {missing} no longer in the source")
    elif args.sample and args.sample < len(everything):
        chosen = random.Random(args.seed).sample(everything, args.sample)
    selection_of = (lambda path: list(args.tests)) if args.tests else TESTS.__getitem__
    chosen.sort(key=lambda m: (m.path, m.line, m.col))
    equivalent = load_equivalent()

    tmp = Path(tempfile.mkdtemp(prefix="gategrad-mutate-"))
    workers = max(1, args.jobs)
    copies = [tmp / f"w{i}" for i in range(workers)]
    for c in copies:
        _copy_repo(c)
    print(f"copies of the repository in {tmp}", flush=True)
    try:
        limits: dict[str, float] = {}
        baseline: dict[tuple[str, ...], float] = {}
        for path in sorted({m.path for m in chosen}):
            selection = tuple(selection_of(path))
            if args.limit:
                limits[path] = args.limit
                continue
            if selection not in baseline:
                status, seconds, tail = run_tests(
                    copies[0], selection_of(path), 3600, args.hypothesis_seed, args.pytest_args
                )
                if status != "pass":
                    print(f"the unmutated tests for {path} fail:\n{tail}", file=sys.stderr)
                    return 2
                baseline[selection] = seconds
            limits[path] = args.timeout_factor * baseline[selection] + 30
            print(
                f"baseline {path}: {baseline[selection]:.1f} s (limit {limits[path]:.0f} s)",
                flush=True,
            )

        free = list(copies)
        done = 0
        t0 = time.monotonic()

        def work(m: Mutant) -> Mutant:
            nonlocal done
            workdir = free.pop()
            target = workdir / m.path
            original = target.read_text()
            try:
                target.write_text(apply(original, m))
                status, m.seconds, tail = run_tests(
                    workdir,
                    selection_of(m.path),
                    limits[m.path],
                    args.hypothesis_seed,
                    args.pytest_args,
                )
            finally:
                target.write_text(original)
                free.append(workdir)
            if status == "pass":
                m.outcome = "equivalent" if m.key in equivalent else "survived"
            else:
                m.outcome = "killed" if status == "fail" else "timeout"
            if m.outcome in ("timeout",):
                m.detail = tail[-300:]
            done += 1
            eta = (time.monotonic() - t0) / done * (len(chosen) - done)
            print(
                f"[{done}/{len(chosen)}] {m.outcome:10s} {m.seconds:5.1f}s  {m.key}  "
                f"(eta {eta / 60:.0f} min)",
                flush=True,
            )
            return m

        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(work, chosen))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    counts = Counter(m.outcome for m in results)
    judged = len(results) - counts["equivalent"]
    killed = counts["killed"] + counts["timeout"]
    score = killed / judged if judged else 1.0
    print()
    print(
        f"{len(results)} mutants: {counts['killed']} killed, {counts['timeout']} timed out, "
        f"{counts['survived']} survived, {counts['equivalent']} judged equivalent"
    )
    print(f"score: {killed}/{judged} = {100 * score:.1f}% of the non-equivalent mutants killed")
    print(f"time: {(time.monotonic() - t0) / 60:.1f} min, {args.jobs} job(s)")
    for m in results:
        if m.outcome == "survived":
            print(f"SURVIVED   {m.key}")
    for m in results:
        if m.outcome == "equivalent":
            print(f"EQUIVALENT {m.key}  ## {equivalent[m.key]}")
    if args.out:
        args.out.write_text(json.dumps([dataclasses.asdict(m) for m in results], indent=1))
    return 0 if counts["survived"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
