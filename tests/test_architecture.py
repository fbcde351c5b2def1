"""The layering docs/DESIGN.md promises: imports only go downward, no cycles, no concrete strategy
named outside fedlora/strategies. Read from the source (ast), so a lazy import inside a function counts too."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("kernels", ["fedlora.kernels"]),
    ("data", ["fedlora.data", "fedlora.models"]),
    ("ops", ["fedlora.bank", "fedlora.ops"]),
    ("layers", ["fedlora.layers"]),
    ("federated", ["fedlora.federated"]),
    ("strategies", ["fedlora.strategies"]),
    ("simulation", ["fedlora.simulation"]),
    ("integrations", ["fedlora.integrations", "fedlora.cli", "fedlora.__main__"]),
]
# The package root re-exports the public surface (ops, layers, PEFT drop-in) for `import fedlora`.
TOP = "fedlora"


def module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "kernels"):
        parts = ("fedlora", "kernels", *path.relative_to(ROOT / "kernels").with_suffix("").parts)
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    return None


def imports_of(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != TOP:  # `from fedlora import ops` imports the submodule fedlora.ops, not the root's names
                found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {f for f in found if f == TOP or f.startswith(TOP + ".")}


def all_modules() -> dict[str, Path]:
    files = list((ROOT / "fedlora").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py"))
    return {module_name(p): p for p in files}


def resolve(target: str, known: set[str]) -> str | None:
    """The known module a dotted import target refers to (a name inside a module maps to the module)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(n for n in all_modules() if n != TOP and layer_of(n) is None)
    assert not unplaced, f"modules outside every layer of docs/DESIGN.md: {unplaced}"


def test_imports_only_go_downward():
    modules = all_modules()
    upward = set()
    for name, path in modules.items():
        if name == TOP:
            continue
        mine = layer_of(name)
        for target in imports_of(path, name):
            target = resolve(target, set(modules))
            if target is None or target == TOP:
                if target == TOP:
                    upward.add(f"{name} imports the package root `fedlora` (import the submodule)")
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                upward.add(f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    modules = all_modules()
    graph = {name: {t for t in (resolve(x, set(modules)) for x in imports_of(path, name))
                    if t is not None and t != name and t != TOP and not name.startswith(t + ".")}
             for name, path in modules.items() if name != TOP}
    # A package __init__ importing its own submodules is how packages work; a submodule importing
    # its package __init__ back counts (that is a cycle at import time).
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if state.get(start) is None and visit(start, [start]):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def concrete_strategy_names() -> set[str]:
    import fedlora.strategies as S

    return {cls.__name__ for cls in vars(S).values()
            if isinstance(cls, type) and issubclass(cls, S.Strategy) and cls is not S.Strategy}


@pytest.mark.parametrize("folder", ["fedlora", "examples"])
def test_no_isinstance_on_a_concrete_strategy_outside_strategies(folder):
    names = concrete_strategy_names()
    assert {"FedAvg", "FLoRA", "FlexLoRA"} <= names
    offenders = []
    for path in (ROOT / folder).rglob("*.py"):
        if path.is_relative_to(ROOT / "fedlora" / "strategies"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                kinds = node.args[1] if len(node.args) > 1 else None
                used = {n.id for n in ast.walk(kinds) if isinstance(n, ast.Name)} | {
                    n.attr for n in ast.walk(kinds) if isinstance(n, ast.Attribute)} if kinds else set()
                if used & names:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"type checks on concrete strategies (use a Strategy hook): {offenders}"
