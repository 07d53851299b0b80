"""The package's layering, checked on the import graph (every import statement, function-level ones included).

DESIGN §2: ``data`` imports nothing of ours but the config and its own modules; ``models`` never imports
``scoring``, ``train``, ``metrics`` or ``run``; ``metrics`` never imports ``scoring``; scorers never import each other;
only ``run/`` and ``cli.py`` import ``ray``; only ``tracking/`` imports ``mlflow``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "perceive_ray"
SCORING_SHARED = {"perceive_ray.scoring.base", "perceive_ray.scoring.options", "perceive_ray.scoring.prompts",
                  "perceive_ray.scoring.local", "perceive_ray.scoring"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from a.b import c`` counts as a.b and a.b.c)."""
    found: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def ours(names: set[str], prefix: str) -> set[str]:
    return {n for n in names if n == prefix or n.startswith(prefix + ".")}


def test_the_graph_was_read():
    assert len(MODULES) > 40 and "perceive_ray.evaluation" in MODULES


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layering(name):
    imports = MODULES[name]
    top = name.split(".")[1] if name.count(".") else ""
    if top == "data":
        # data/catalog.py (benchmark name -> adapter) is the one data module that reads the registry's name table.
        allowed = ("perceive_ray.data", "perceive_ray.config") + (
            ("perceive_ray.registry",) if name == "perceive_ray.data.catalog" else ())
        foreign = {n for n in ours(imports, "perceive_ray") - {"perceive_ray"} if not n.startswith(allowed)}
        assert not foreign, f"{name}: data imports nothing of ours but config types: {sorted(foreign)}"
    if top == "models":
        for layer in ("scoring", "train", "metrics", "run", "evaluation"):
            bad = ours(imports, f"perceive_ray.{layer}")
            assert not bad, f"{name}: models never import {layer}: {sorted(bad)}"
    if top == "metrics":
        bad = ours(imports, "perceive_ray.scoring") | ours(imports, "perceive_ray.run")
        assert not bad, f"{name}: metrics never import scoring or run: {sorted(bad)}"
    if top == "scoring" and name not in SCORING_SHARED:
        others = {n for n in ours(imports, "perceive_ray.scoring")
                  if not any(n == s or n.startswith(s + ".") for s in SCORING_SHARED)}
        assert not others, f"{name}: scorers do not import each other: {sorted(others)}"
    if top != "run" and name != "perceive_ray.cli":
        assert not ours(imports, "ray"), f"{name}: only run/ and cli.py import ray"
    if top != "tracking":
        assert not ours(imports, "mlflow"), f"{name}: only tracking/ imports mlflow"


def test_the_scores_schema_is_defined_once():
    """One definition of the scores-table columns (data/scores.py); everyone else imports it."""
    definitions = [p for p in PACKAGE.rglob("*.py") if "SCORE_COLUMNS = " in p.read_text()]
    assert [p.relative_to(PACKAGE).as_posix() for p in definitions] == ["data/scores.py"]


def test_chat_templates_live_in_models():
    assert "perceive_ray.models.chat_templates" in MODULES
    definitions = [p for p in PACKAGE.rglob("*.py") if "class ConversationTemplate" in p.read_text()]
    assert [p.relative_to(PACKAGE).as_posix() for p in definitions] == ["models/chat_templates.py"]
