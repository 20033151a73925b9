"""The package layout's rules, read from the source (AST): which way imports point, no import cycles (also
through imports inside functions), and no module past the size a reader takes in."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "sdrt"
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """sdrt module -> the sdrt modules it imports anywhere in it (a `from pkg import name` counts pkg.name
    when that is a module, else pkg)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found, tree = set(), ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue  # annotations only: not an import at run time
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("sdrt")}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if target.startswith("sdrt"):
                    subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
                    found |= subs if len(subs) == len(node.names) else subs | {target}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_cycles_between_modules():
    graph = _imports()
    # A package's __init__ re-exporting its modules is not a cycle of the modules themselves.
    inits = {m for m in graph if (ROOT.parent / m.replace(".", "/") / "__init__.py").is_file()}
    modules_only = {m: {n for n in deps if n not in inits} for m, deps in graph.items() if m not in inits}
    assert _cycle(modules_only) is None


def test_imports_point_one_way():
    graph = _imports()
    for module, deps in graph.items():
        if _within(module, "sdrt.runtime"):
            assert not {d for d in deps if _within(d, "sdrt.export") or d in ("sdrt.cli", "sdrt.bench")}, module
        if _within(module, "sdrt.runtime.engines"):  # the hardware side never reaches into the numpy pipeline
            allowed = ("sdrt.runtime.engines", "sdrt.runtime.manifest", "sdrt.runtime.names", "sdrt.runtime.fsutil",
                       "sdrt.runtime.families", "sdrt.errors", "sdrt")
            assert all(any(_within(d, a) if a != "sdrt" else d == "sdrt" for a in allowed) for d in deps), \
                (module, deps)
        if _within(module, "sdrt.serve"):  # the server runs bundles on the numpy side: no torch, no exporter
            assert not {d for d in deps if _within(d, "sdrt.export") or d in ("sdrt.cli", "sdrt.bench")}, module
            assert not {d for d in deps if _within(d, "sdrt.runtime.engines")}, (module, deps)
        if _within(module, "sdrt.runtime.families"):  # descriptions: names, and the text side they open
            assert all(d in ("sdrt.runtime.names", "sdrt.errors", "sdrt.runtime.text", "sdrt.runtime.tokenizer")
                       or _within(d, "sdrt.runtime.families") for d in deps), (module, deps)


def test_the_numpy_side_asks_the_engines_package_for_engines():
    """The pipeline and its modules use `open_engines` and the Engine interface, nothing TensorRT- or
    CUDA-specific."""
    for module, deps in _imports().items():
        if _within(module, "sdrt.runtime") and not _within(module, "sdrt.runtime.engines"):
            inner = {d for d in deps if _within(d, "sdrt.runtime.engines")}
            assert inner <= {"sdrt.runtime.engines", "sdrt.runtime.engines.base"}, (module, inner)


def test_modules_fit_a_reader():
    long = {p.relative_to(ROOT.parent).as_posix(): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long
