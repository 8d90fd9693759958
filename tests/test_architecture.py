"""The shape of the house: which package may import which (every module, every import).

- ``ingest.core`` imports nothing else of the project;
- ``ingest.collector``, ``ingest.partitions``, ``ingest.loadgen`` and ``consumers``
  import ``ingest.core`` (and themselves);
- ``consumers`` and ``ingest.stack`` may also use the partition manager's public
  API (the package ``ingest.partitions``, not its modules);
- ``ingest.rollups`` (the analysis tables' refresh) imports ``ingest.core``; ``ingest.stack``
  uses its public API (``up`` refreshes on a timer), and ``consumers`` (a loader process
  exports the rollups' lag gauges) and ``ingest.privacy`` (an erasure recomputes them);
- ``ingest.stack`` starts the embedded services and runs ``up``;
- only ``ingest.cli`` imports ``consumers``; nothing imports ``ingest.cli``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> what it may import besides itself
ALLOWED: dict[str, set[str]] = {
    "ingest.core": set(),
    "ingest.collector": {"ingest.core"},
    "ingest.partitions": {"ingest.core"},
    "ingest.loadgen": {"ingest.core"},
    "ingest.stack": {"ingest.core", "ingest.partitions", "ingest.rollups"},
    "ingest.rollups": {"ingest.core"},
    "consumers": {"ingest.core", "ingest.partitions", "ingest.rollups"},
    "ingest.privacy": {"ingest.core", "ingest.partitions", "ingest.rollups"},
    "ingest.cli": {"*"},
}
PUBLIC_ONLY = {
    "ingest.partitions",
    "ingest.rollups",
}  # used by others through the package, not its modules


def _module(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _owner(module: str) -> str | None:
    for package in sorted(ALLOWED, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every project module ``path`` imports, at any depth of the file (functions too)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # ``from ingest import core`` names a module too
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(n, m) for n, m in found if m.split(".")[0] in ("ingest", "consumers")]


def violations(root: Path = ROOT) -> list[str]:
    """Each import that breaks the rules, as ``file:line: a -> b``."""
    bad: list[str] = []
    files = [*root.glob("ingest/**/*.py"), *root.glob("consumers/**/*.py")]
    for path in sorted(files):
        source = _owner(_module(path, root))
        if source is None:  # ingest/__init__.py: the version only
            continue
        for line, target in _imports(path):
            owner = _owner(target)
            if owner is None or owner == source:
                continue
            allowed = ALLOWED[source]
            where = f"{path.relative_to(root)}:{line}: {source} -> {target}"
            if owner == "ingest.cli":
                bad.append(where + " (nothing imports the CLI)")
            elif "*" in allowed:
                continue
            elif owner not in allowed:
                bad.append(where)
            elif owner in PUBLIC_ONLY and any(
                target == sub or target.startswith(sub + ".") for sub in _submodules(owner, root)
            ):
                bad.append(where + f" (use {owner}'s public API)")
    return bad


def _submodules(package: str, root: Path = ROOT) -> set[str]:
    directory = root.joinpath(*package.split("."))
    return {f"{package}.{p.stem}" for p in directory.glob("*.py") if p.stem != "__init__"}


def test_imports_follow_the_rules() -> None:
    assert violations() == []


def test_the_rules_catch_a_forbidden_edge(tmp_path: Path) -> None:
    """The check itself can fail: a copy of the tree with one bad edge added is caught."""
    import shutil

    for top in ("ingest", "consumers"):
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("*.pyc"))
    edges = {
        "ingest/core/settings.py": "from ingest.collector import app\n",
        "consumers/offsets.py": "from ingest.collector.app import create_app\n",
        "ingest/collector/app.py": "import consumers.loader\n",
        "ingest/stack/up.py": "from ingest.cli import main\n",
        "consumers/rows.py": "from ingest.partitions.manager import PartitionManager\n",
    }
    for file, edge in edges.items():
        target = tmp_path / file
        original = target.read_text()
        target.write_text(original + "\n\ndef _edge() -> None:\n    " + edge)
        found = violations(tmp_path)
        assert any(v.startswith(file) for v in found), (file, found)
        target.write_text(original)
    assert violations(tmp_path) == []
