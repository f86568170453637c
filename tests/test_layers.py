"""The engine's two layers (README, Layout): the torch-free modules — what the dashboard, the worker's
supervising process and the CLI's parsing import — and the torch modules that train and measure. A
torch-free module may reach the torch layer only inside a function (where a command starts training);
the dashboard never does, not even there."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TORCH_FREE = {"analysis", "app", "calibrate", "cifar", "cli", "commands", "config", "executors", "packing", "presets",
              "ray_executor", "registry", "shutdown", "study", "submission", "ticks", "worker"}
TORCH = {"bench", "data", "hessian", "jobs", "models", "optim", "packnet", "quantities", "runner", "runtime",
         "solutions", "trainer"}


def engine_modules() -> set[str]:
    return {p.stem for p in (ROOT / "engine").glob("*.py") if p.stem not in ("__init__", "__main__")}


def engine_imports(path: Path, top_level_only: bool) -> set[str]:
    """The engine modules a file imports (absolute or relative), at module level only or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            relative_in_engine = node.level == 1 and path.parent.name == "engine"
            inside = relative_in_engine or (node.level == 0 and (node.module or "").split(".")[0] == "engine")
            module = (node.module or "") if node.level else (node.module or "").removeprefix("engine").strip(".")
            if inside:
                found |= {module.split(".")[0]} if module else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names
                      if alias.name.startswith("engine.")}
    return found & engine_modules()


def test_every_engine_module_belongs_to_one_layer():
    assert not TORCH_FREE & TORCH
    assert engine_modules() == TORCH_FREE | TORCH, engine_modules() ^ (TORCH_FREE | TORCH)


def test_torch_free_modules_import_only_torch_free_modules_at_module_level():
    for name in sorted(TORCH_FREE):
        path = ROOT / "engine" / f"{name}.py"
        assert not engine_imports(path, top_level_only=True) & TORCH, name
        assert "torch" not in {alias.name.split(".")[0] for node in ast.parse(path.read_text()).body
                               if isinstance(node, ast.Import) for alias in node.names}, name


def test_importing_the_whole_torch_free_layer_loads_no_torch():
    code = "import sys\n" + "".join(f"import engine.{name}\n" for name in sorted(TORCH_FREE)) + \
           "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_the_dashboard_imports_only_the_torch_free_layer_even_inside_functions():
    files = [ROOT / "streamlit_app.py", *(ROOT / "dashboard").rglob("*.py")]
    for path in files:
        assert not engine_imports(path, top_level_only=False) & TORCH, path
        assert "import torch" not in path.read_text(), path
