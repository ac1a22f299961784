"""The import edges of docs/architecture.md: modules import along the flow, never against it (imports inside
functions count too)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sdtune"


def imported(path: Path) -> set[str]:
    """Dotted names a module imports, relative imports resolved against the package (``sdtune.…``)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            out |= {module} | {f"{module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("module, forbidden", [
    ("compose.py", ("sdtune.fusion",)),                        # sampling applies files; it does not fuse them
    ("models.py", ("sdtune.formats",)),                        # loading a base model needs no adapter-file reader
    ("config.py", ("sdtune.inject", "diffusers")),             # parsing a config needs no model code
    ("apply.py", ("sdtune.fusion", "sdtune.train")),
])
def test_no_module_imports_against_the_flow(module, forbidden):
    bad = {name for name in imported(PACKAGE / module) for f in forbidden if name == f or name.startswith(f + ".")}
    assert not bad, f"{module} imports {sorted(bad)}"


def test_adapters_import_nothing_above_them():
    for path in (PACKAGE / "adapters").glob("*.py"):
        outside = {n for n in imported(path) if n.startswith("sdtune.") and not n.startswith("sdtune.adapters")
                   and not n.startswith("sdtune.atomic")}
        assert not outside, f"{path.name} imports {sorted(outside)}"


def test_the_library_never_imports_the_toy_world():
    """``sdtune.toy`` (scenes, judge, pretraining) is a measuring stick: tests and benches use it, the library not."""
    for path in PACKAGE.rglob("*.py"):
        if "toy" in path.relative_to(PACKAGE).parts:
            continue
        toy = {n for n in imported(path) if n == "sdtune.toy" or n.startswith("sdtune.toy.")}
        assert not toy, f"{path.relative_to(PACKAGE)} imports {sorted(toy)}"

