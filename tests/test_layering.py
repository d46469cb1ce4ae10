"""The layering of shared/ and jobs/: no import cycles, and no layer imports one above it.

    core <- store <- data <- train <- train.fast <- evaluate <- publish, serve <- cluster <- jobs <- jobs.cli

Imports are read with ``ast`` (nothing is executed), including the ones inside functions: a
lazy import still couples two modules. Two packages on the same rank (publish, serve) may not
import each other; jobs never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Most specific prefix first; the rank says which packages a module may import from.
LAYERS = [
    ("shared.core", 0),
    ("shared.store", 1),
    ("shared.data", 2),
    ("shared.train.fast", 4),
    ("shared.train", 3),
    ("shared.evaluate", 5),
    ("shared.publish", 6),
    ("shared.serve", 6),
    ("shared.cluster", 7),
    ("jobs.cli", 9),  # the `lawtune` command dispatches to the jobs
    ("jobs", 8),
]


def layer_of(module: str) -> tuple[str, int] | None:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    return None


def modules_under(root: Path, packages: tuple[str, ...] = ("shared", "jobs")) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ``known`` that ``module`` imports, anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a.b import c`: c may be a module of its own or a name in a.b
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import shared.core.config.X` -> the nearest module
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def violations(root: Path, packages: tuple[str, ...] = ("shared", "jobs")) -> list[str]:
    known = modules_under(root, packages)
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    problems = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module)
        for target in sorted(targets):
            theirs = layer_of(target)
            if mine is None or theirs is None or mine[0] == theirs[0]:
                if mine and theirs and mine[0] == "jobs" and "jobs" not in (module, target):
                    problems.append(f"{module} imports {target}: jobs never import each other")
                continue
            if theirs[1] >= mine[1]:
                problems.append(f"{module} ({mine[0]}) imports {target} ({theirs[0]}): a layer may only import from below it")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_shared_and_jobs_import_only_downwards_and_without_cycles():
    assert violations(ROOT) == []


def test_every_module_belongs_to_a_layer():
    homeless = [m for m in modules_under(ROOT) if m not in ("shared", "jobs") and layer_of(m) is None]
    assert homeless == [], "place new modules in one of the domain packages (tests/test_layering.py LAYERS)"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    "files, expected",
    [
        pytest.param(
            {"shared/__init__.py": "", "shared/train/__init__.py": "", "shared/train/training.py": "def f():\n    from shared.train.fast import speedups\n",
             "shared/train/fast/__init__.py": "", "shared/train/fast/speedups.py": "from shared.train.training import f\n"},
            ["shared.train.training (shared.train) imports shared.train.fast.speedups (shared.train.fast): a layer may only import from below it",
             "import cycle: shared.train.fast.speedups -> shared.train.training -> shared.train.fast.speedups"],
            id="the-old-training-speedups-cycle",
        ),
        pytest.param(
            {"shared/__init__.py": "", "shared/cluster/__init__.py": "", "shared/cluster/driver.py": "from . import k8s\n",
             "shared/cluster/k8s.py": "def g():\n    from .driver import summarize\n"},
            ["import cycle: shared.cluster.driver -> shared.cluster.k8s -> shared.cluster.driver"],
            id="a-cycle-inside-one-package-relative-imports",
        ),
        pytest.param(
            {"shared/__init__.py": "", "shared/core/__init__.py": "", "shared/core/config.py": "import shared.evaluate.metrics\n",
             "shared/evaluate/__init__.py": "", "shared/evaluate/metrics.py": "X = 1\n"},
            ["shared.core.config (shared.core) imports shared.evaluate.metrics (shared.evaluate): a layer may only import from below it"],
            id="core-importing-a-stage",
        ),
        pytest.param(
            {"shared/__init__.py": "", "shared/serve/__init__.py": "", "shared/serve/gateway.py": "from shared.publish.merge import m\n",
             "shared/publish/__init__.py": "", "shared/publish/merge.py": "m = 1\n"},
            ["shared.serve.gateway (shared.serve) imports shared.publish.merge (shared.publish): a layer may only import from below it"],
            id="siblings-on-one-rank",
        ),
        pytest.param(
            {"jobs/__init__.py": "", "jobs/a.py": "from jobs.b import x\n", "jobs/b.py": "x = 1\n",
             "shared/__init__.py": "", "shared/core/__init__.py": "", "shared/core/log.py": "\n"},
            ["jobs.a imports jobs.b: jobs never import each other"],
            id="jobs-importing-jobs",
        ),
        pytest.param(
            {"shared/__init__.py": "", "shared/core/__init__.py": "", "shared/core/log.py": "\n",
             "shared/store/__init__.py": "", "shared/core/uri.py": "from shared.core import log\n",
             "jobs/__init__.py": "", "jobs/a.py": "from shared.core.uri import x\nimport shared.core.log\n"},
            [],
            id="downward-imports-pass",
        ),
    ],
)
def test_the_checker_catches_cycles_and_upward_imports_in_a_synthetic_tree(tmp_path, files, expected):
    assert violations(_tree(tmp_path, files)) == expected
