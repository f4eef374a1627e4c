"""The package's shape (docs/DESIGN.md "Layers"): no import cycles, imports only downward, short modules.

Reads every module of ``lors_fast`` (and the CLI, installed as ``lors_fast.cli``) with :mod:`ast`, so it sees
every import, module-level or inside a function, and builds the graph module -> imported ``lors_fast`` module
(``from pkg import name`` counts as an import of ``pkg.name`` when that is a module). Implicit imports of
parent packages are not edges (every package ``__init__`` here imports little or nothing).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lors_fast"
CLI = ROOT / "cli"

# who may import whom: cli -> engine -> core / ops / data (+ the top-level models); core, ops and data never
# import the engine or the CLI; nothing below the CLI imports it
FORBIDDEN = {
    "lors_fast.core": ("lors_fast.engine", "lors_fast.cli"),
    "lors_fast.ops": ("lors_fast.engine", "lors_fast.cli"),
    "lors_fast.data": ("lors_fast.engine", "lors_fast.cli"),
    "lors_fast.engine": ("lors_fast.cli",),
    "lors_fast.models": ("lors_fast.engine", "lors_fast.cli"),
}
MAX_LINES = 700
MAX_TOP_MODULES = 6


def _modules() -> dict[str, Path]:
    mods = {}
    for base, name in ((PKG, "lors_fast"), (CLI, "lors_fast.cli")):
        for p in base.rglob("*.py"):
            parts = [name, *p.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def _is_pkg(path: Path) -> bool:
    return path.name == "__init__.py"


def import_graph(mods: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module -> the lors_fast modules it imports (anywhere in its body)."""
    mods = mods or _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        base = mod.split(".") if _is_pkg(path) else mod.split(".")[:-1]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - (node.level - 1)]
                    src = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                names = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            else:
                continue
            for n in names:
                # the longest known module that n names (import a.b.c imports a.b.c; an attribute maps to its module)
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    out.add(n)
        graph[mod] = out
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert len(graph) > 30, "the walk missed the package"
    assert cycles(graph) == []


def test_imports_only_downward():
    bad = []
    for mod, deps in import_graph().items():
        for layer, banned in FORBIDDEN.items():
            if mod == layer or mod.startswith(layer + "."):
                bad += [f"{mod} -> {d}" for d in deps if any(d == b or d.startswith(b + ".") for b in banned)]
    assert bad == []


def test_layout_modules_short_and_few_at_the_top():
    mods = _modules()
    for sub in ("core", "core/streaming", "ops", "engine", "data"):
        assert (PKG / sub / "__init__.py").is_file(), sub
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    long = {m: n for m, p in mods.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_process_wide_state_changed_at_import():
    """No module-level warning filters (scope them with warnings.catch_warnings())."""
    bad = []
    for mod, path in _modules().items():
        for node in ast.parse(path.read_text()).body:
            src = ast.unparse(node)
            if isinstance(node, ast.Expr) and re.search(r"warnings\.(filterwarnings|simplefilter)", src):
                bad.append(mod)
    assert bad == []


def test_public_paths_stay_importable():
    import lors_fast
    import lors_fast.losses
    from lors_fast.core import losses
    from lors_fast.ops import TritonPrimitives

    assert lors_fast.losses.ClipLoss is losses.ClipLoss
    assert callable(lors_fast.contrastive_loss) and TritonPrimitives.__name__ == "TritonPrimitives"
    for name in ("LowRankTarget", "LowRankSimilarity", "FullSimilarity", "retrieval_metrics"):
        assert getattr(lors_fast, name) is not None


# textual fingerprints of the kind list and of φ's formulas: they may appear only in lors_fast/core/kinds.py
_COPIES = [
    re.compile(r'"infonce",\s*"bce",\s*"wbce"'),  # the kind list
    re.compile(r'"bce",\s*"wbce",\s*"mse",\s*"softplus"'),  # the pair-sum φ list
    re.compile(r"log\(\s*\w+\s*\+\s*(1e-6|EPS)\s*\)\s*-\s*\(1\s*-\s*S\)"),  # wbce's ℓ
    re.compile(r"softplus\(-?Z\)\.clamp_max\(100"),  # bce's φ
    re.compile(r"clamp\(softplus\(-Z\),\s*max="),
    re.compile(r"EPS\s*=\s*1e-6"),
]


def test_kinds_and_phi_written_once():
    here = Path(__file__).resolve()
    hits = []
    for base in (PKG, CLI, ROOT / "tests", ROOT / "bench"):
        for p in base.rglob("*.py"):
            if p == PKG / "core" / "kinds.py" or p == here:
                continue
            text = p.read_text()
            hits += [f"{p.relative_to(ROOT)}: {rx.pattern}" for rx in _COPIES if rx.search(text)]
    assert hits == []
    kinds_src = (PKG / "core" / "kinds.py").read_text()
    assert all(rx.search(kinds_src) for rx in (_COPIES[0], _COPIES[4], _COPIES[5])), "the fingerprints went stale"


def test_citations_resolve_inside_the_repository():
    """Docstrings cite design notes a reader of the repository has: docs/ files that exist, never the
    steering documents outside it (LORS_SPEC, KERNELS.md, CALIBRATION.md)."""
    outside = re.compile(r"\bLORS_SPEC\b|(?<![\w/])KERNELS\.md|\bCALIBRATION\.md|\.\./shared/")
    cited = re.compile(r"docs/([A-Z_]+\.md)")
    bad, missing = [], set()
    for p in [*PKG.rglob("*.py"), *CLI.rglob("*.py")]:
        text = p.read_text()
        bad += [f"{p.relative_to(ROOT)}: {m.group(0)}" for m in outside.finditer(text)]
        missing |= {m.group(1) for m in cited.finditer(text) if not (ROOT / "docs" / m.group(1)).is_file()}
    assert bad == [] and missing == set()
