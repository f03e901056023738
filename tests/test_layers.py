"""The package's layers, as the README's module table declares them: every module is in the table
once, every import (those inside functions included) goes to the same layer or one below, and no
imports close a circle."""

import ast
import re

from conftest import ROOT

LAB = ROOT / "lab"
# Bottom to top. A module may import from its own layer and the layers below it.
LAYERS = ["ground", "device", "recipe", "inputs", "docker", "pipeline", "runtime", "commands"]


def declared() -> dict[str, str]:
    """README's module table: `lab/x.py` or `lab/folder/` -> its layer."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(lab/[\w/.]+)` \| (\w+) \|", text, re.M)}


def unit_of(path) -> str:
    """A module's entry in the table: its file, or the folder it sits in."""
    rel = path.relative_to(ROOT)
    return f"{rel.parts[0]}/{rel.parts[1]}/" if len(rel.parts) > 2 else str(rel)


def modules() -> dict[str, object]:
    out = {}
    for path in LAB.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports() -> dict[str, set[str]]:
    """Module -> the lab modules it imports (anywhere in the file)."""
    mods = modules()
    edges = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in mods and t not in (name, "lab")}
    return edges


def test_the_module_table_lists_every_module_once():
    table = declared()
    units = {unit_of(p) for p in LAB.rglob("*.py") if p.parent != LAB or p.name not in ("__init__.py", "__main__.py")}
    assert set(table) == units, (sorted(units - set(table)), sorted(set(table) - units))
    assert set(table.values()) <= set(LAYERS), set(table.values()) - set(LAYERS)


def test_imports_run_down_the_layers_and_close_no_circle():
    table, mods, edges = declared(), modules(), imports()
    layer = {name: LAYERS.index(table[unit_of(path)]) for name, path in mods.items() if unit_of(path) in table}
    upward = [f"{a} ({LAYERS[layer[a]]}) -> {b} ({LAYERS[layer[b]]})"
              for a, targets in edges.items() if a in layer for b in targets if b in layer and layer[b] > layer[a]]
    assert not upward, upward

    # Circles: a depth-first search for a back edge, over every module.
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                circles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not circles, circles
