"""The engine's modules import one another without a cycle: each import statement anywhere in a module
(at the top, inside a function, under TYPE_CHECKING) is an edge of the graph, read with `ast`."""
import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"


def imported(path: Path, modules: set[str]) -> set[str]:
    """The engine modules that the module at `path` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:                                   # from .x import y / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.level == 0 and node.module and node.module.split(".")[0] == "engine":
                parts = node.module.split(".")
                names = parts[1:2] if len(parts) > 1 else [a.name for a in node.names]
            else:
                continue
            found |= {n.split(".")[0] for n in names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("engine.")}
    return found & modules


def import_graph(folder: Path = ENGINE) -> dict[str, set[str]]:
    modules = {p.stem for p in folder.glob("*.py")}
    return {m: imported(folder / f"{m}.py", modules) - {m} for m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}        # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_engine_has_no_import_cycle():
    graph = import_graph()
    assert {"trainer", "quantities", "runner", "packing"} <= set(graph)
    assert "quantities" in graph["trainer"] and "trainer" in graph["runner"]     # the graph is read at all
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in engine/: " + " -> ".join(cycle)


def test_quantities_see_the_loop_only_through_their_measuring_context():
    graph = import_graph()
    assert not graph["quantities"] & {"trainer", "runner", "worker", "commands"}, graph["quantities"]


def test_the_cycle_finder_finds_cycles(tmp_path):
    """The check can fail: a cycle through a function-level import and one through TYPE_CHECKING are found."""
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import c\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from engine.a import y\n")
    (tmp_path / "d.py").write_text("import engine.a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (tmp_path / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path)) is None


def member_writes(path: Path) -> list[str]:
    """Assignments to an attribute of a training-loop member (a name `m` or `member`, or `<x>.member`)
    in the module at `path`: `m.step = ...`, `member.recorder = ...`, `m.count += 1`, setattr(m, ...)
    (not `m.control.ended = ...`: that writes the control, which its owner may)."""
    def is_member(node) -> bool:
        return (isinstance(node, ast.Name) and node.id in ("m", "member")) or \
            (isinstance(node, ast.Attribute) and node.attr == "member")

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            for part in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(part, ast.Attribute) and is_member(part.value):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(part)}")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args \
                and is_member(node.args[0]):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_trainer_writes_a_members_state():
    """Member's state has one owner, engine/trainer.py: the store's side connects a member through
    Member.attach, a control changes its rate through set_rate, quantities carry state through Measuring."""
    writes = [w for p in sorted(ENGINE.glob("*.py")) if p.name != "trainer.py" for w in member_writes(p)]
    assert writes == [], writes
    assert member_writes(ENGINE / "trainer.py")          # the scan sees writes where there are some


def test_the_member_write_scan_finds_writes(tmp_path):
    (tmp_path / "x.py").write_text("def f(m, c):\n    m.count += 1\n    c.member.step = 3\n    m.control.ended = True\n"
                                   "    setattr(m, 'w', 0)\n    other.step = 1\n    d[m.run_id] = 2\n    m.a, x = 1, 2\n")
    assert sorted(member_writes(tmp_path / "x.py")) == ["x.py:2: m.count", "x.py:3: c.member.step",
                                                "x.py:5: setattr(m, 'w', 0)", "x.py:8: m.a"]
