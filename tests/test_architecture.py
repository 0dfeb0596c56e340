"""Architecture rules the code base keeps: one place builds train steps."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _calls(path: Path, name: str) -> list[int]:
    """Lines where `path` calls a function named `name` (as `name(...)` or `x.name(...)`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Name) and node.func.id == name)
        or (isinstance(node.func, ast.Attribute) and node.func.attr == name))]


def test_make_train_step_is_called_from_the_training_builder_only():
    files = [p for folder in ("hfjax", "tests", "benchmarks", "scripts")
             for p in (ROOT / folder).rglob("*.py")]
    callers = {str(p.relative_to(ROOT)): lines for p in files
               if (lines := _calls(p, "make_train_step"))}
    assert callers.keys() == {"hfjax/train/builder.py"}, callers
