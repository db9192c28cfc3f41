"""docs/architecture.md stays true to the tree: every file it names exists, and every module of the
package has its row in the table of roles (a new or renamed module must be placed on the page)."""
from __future__ import annotations

import re


def _doc(repo_root) -> str:
    return (repo_root / "docs" / "architecture.md").read_text()


def test_every_named_file_exists(repo_root):
    named = set(re.findall(r"`((?:ark_ray|jobs|bench|serve_configs|cluster|dashboards|docs)/[^`\s:]*)`", _doc(repo_root)))
    assert len(named) > 50
    assert sorted(p for p in named if not (repo_root / p).exists()) == []


def test_every_file_in_the_diagrams_exists(repo_root):
    """The diagrams name package files relative to ark_ray/ (`opd/rollout.py`)."""
    named = set(re.findall(r"(?<![\w/])((?:audio|data|engines|eval|model|opd|serve|train|vllm_plugin)/\w+\.py)",
                           _doc(repo_root)))
    assert len(named) > 20
    assert sorted(p for p in named if not (repo_root / "ark_ray" / p).exists()) == []


def test_every_module_has_a_role(repo_root):
    table = {m for m in re.findall(r"`(ark_ray/[\w/]+\.py)`", _doc(repo_root))}
    modules = {str(p.relative_to(repo_root)) for p in (repo_root / "ark_ray").rglob("*.py")
               if p.name != "__init__.py" or p.parent.name == "vllm_plugin"}
    assert sorted(modules - table) == []
