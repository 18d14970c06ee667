"""The package's architecture, as its imports: each module imports only from its own sub-package or
from a layer below it, there are no import cycles, and nothing but `cli` imports `commands/`.

    cli -> commands -> training -> inference -> data -> modelio -> modelmeta -> model -> distributed -> config -> utils
    -> errors
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "emotion_dist"
LAYERS = [  # top to bottom; a module may import its own layer's package or any layer below
    {"__main__"},
    {"cli", "api"},
    {"commands"},
    {"training"},
    {"inference"},
    {"data"},
    {"modelio"},
    {"modelmeta"},
    {"model"},
    {"distributed"},
    {"config"},
    {"utils"},
    {"errors"},
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The emotion_dist modules a file imports, as dotted names, at any depth in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("emotion_dist"):
            assert node.level == 0, f"{path}: relative import; import emotion_dist.* by its full name"
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if _exists(full) else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("emotion_dist"))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; import emotion_dist.* by its full name")
    return out


def _exists(dotted: str) -> bool:
    p = PKG.parent.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _package(dotted: str) -> str | None:
    """The sub-package a module belongs to (None for a module at the package's root)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 2 or (PKG / parts[-1]).is_dir() else None


def _layer(dotted: str) -> int:
    parts = dotted.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if key in names:
            return i
    raise AssertionError(f"{dotted} is in no layer; add its package to LAYERS in {__file__}")


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def test_every_import_goes_down_the_layers():
    wrong = []
    for mod, deps in _graph().items():
        for dep in deps:
            if dep in ("emotion_dist", mod) or _package(dep) == _package(mod):
                continue  # the version string; or a module of the same sub-package
            if _layer(dep) <= _layer(mod):
                wrong.append(f"{mod} imports {dep}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_only_the_cli_imports_commands():
    users = {mod for mod, deps in _graph().items() if not mod.startswith("emotion_dist.commands")
             and any(d.startswith("emotion_dist.commands") for d in deps)}
    assert users <= {"emotion_dist.cli"}, users


def test_the_package_has_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph.get(node, set()) - {node}):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_sub_package_inits_stay_empty():
    """Importing a sub-package costs nothing, so `emotion-dist --help` stays fast."""
    for init in PKG.rglob("__init__.py"):
        if init.parent != PKG:
            assert init.read_text().strip() == "", f"{init} should stay empty"
