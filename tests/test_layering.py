"""Lower layers never import upper ones (docs/architecture.md, section Layers)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import mempool

SRC = Path(mempool.__file__).parent
# rank of each part: a module may import only parts of lower or equal rank
RANKS = {
    "config": 0,
    "errors": 0,
    "types": 0,
    "alloc": 1,
    "index": 2,
    "transport": 3,
    "pool": 4,
    "integrations": 5,
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m.startswith("mempool.")}


def test_every_module_is_ranked() -> None:
    for info in pkgutil.iter_modules([str(SRC)]):
        assert info.name in RANKS or info.name.startswith("_"), f"mempool.{info.name} has no layer rank"


def test_lower_layers_never_import_upper_ones() -> None:
    violations = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        own = _part(module)
        if own not in RANKS:
            continue
        for imported in _imports(path):
            other = _part(imported)
            if other in RANKS and RANKS[other] > RANKS[own]:
                violations.append(f"{module} imports {imported}")
    assert not violations, "\n".join(violations)


def test_import_mempool_needs_only_core_dependencies() -> None:
    code = (
        "import sys, mempool\n"
        "p = mempool.MemPool(mempool.PoolConfig(num_layers=1, num_kv_heads=1, head_dim=2, block_size=2, device_blocks=2))\n"
        "bad = [m for m in ('ucxx', 'cupy', 'transformers', 'hypothesis', 'pytest') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_all_public_names_resolve() -> None:
    for name in mempool.__all__:
        assert getattr(mempool, name) is not None
    for pkg in ("mempool.alloc", "mempool.index", "mempool.transport"):
        mod = importlib.import_module(pkg)
        for name in mod.__all__:
            assert getattr(mod, name) is not None


def test_the_library_never_imports_the_example_server() -> None:
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m == "memserve" or m.startswith("memserve.") for m in names), path
