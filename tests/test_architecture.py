"""The import structure of docs/architecture.md: no circles, and every layer imports downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# import name -> folder (pipelines/ and rewards/ install as steer.pipelines / steer.rewards)
PACKAGES = {"steer": ROOT / "steer", "steer.pipelines": ROOT / "pipelines",
            "steer.rewards": ROOT / "rewards"}  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([name, *parts])] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """Every steer module ``module`` imports, anywhere in the file (a function's lazy import
    too), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    guarded = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    ]
    skip = {id(n) for node in guarded for n in ast.walk(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base]) if base else ".".join(up)
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        out |= {n for n in names if n in MODULES and n != module}
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_no_import_circles() -> None:
    """Depth-first search for a back edge; a package's ``__init__`` re-exporting its own
    submodules is not a circle (its submodules import siblings, not the package)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if n.startswith(m + "."):  # a package importing its own submodule
                continue
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(n) :], n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    return {"digits": 4, "train": 3, "pipelines": 3, "testing": 3, "cli": 5, "diffusion": 2,
            "toy": 2, "discrete": 2}.get(top, 1)  # fmt: skip


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    """No module imports a higher layer (rewards are reached by registry names only)."""
    if module.startswith("steer.rewards"):
        assert not {n for n in GRAPH[module] if not n.startswith("steer.rewards")} - {
            "steer.trajectory"
        }, f"{module} imports {GRAPH[module]}"
        return
    up = {n for n in GRAPH[module] if _layer(n) > _layer(module)}
    assert not up, f"{module} imports a higher layer: {sorted(up)}"


def test_the_trainer_never_names_the_digits_application_in_code() -> None:
    """steer.train reaches steer.digits only through names in the preset (strings)."""
    train = {m: d for m, d in GRAPH.items() if m.startswith("steer.train")}
    assert not {n for deps in train.values() for n in deps if n.startswith("steer.digits")}


def test_core_and_samplers_do_not_import_diffusers() -> None:
    """objectives, trajectory, ops, toy and discrete are torch-only (docs/architecture.md)."""
    for module, path in MODULES.items():
        if _layer(module) <= 2 and not module.startswith("steer.diffusion"):
            text = path.read_text()
            assert "import diffusers" not in text and "from diffusers" not in text, module
