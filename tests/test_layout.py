"""Where shared code lives: engines use the neutral utility modules of ``common.data``, never a dataset converter."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / "common" / "engines"
# modules that convert one public dataset's layout; what engines share with them lives in common.data.report_text,
# common.data.findings_table and common.data.boxes
CONVERTERS = ("common.data.ct_rate", "common.data.vindr", "common.data.openi")


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` anywhere in ``source`` names (also inside functions), with
    relative imports resolved against ``package`` and ``from pkg import name`` counted as ``pkg.name`` too (``name``
    may be a submodule)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def converter_imports(modules: set[str]) -> list[str]:
    """The converter modules that ``modules`` name, or name something inside."""
    return sorted(c for c in CONVERTERS if any(m == c or m.startswith(c + ".") for m in modules))


def test_converters_exist():
    for name in CONVERTERS:
        assert (ROOT / (name.replace(".", "/") + ".py")).is_file(), name


@pytest.mark.parametrize("source, bad", [
    ("from common.data.ct_rate import report_text_batch", ["common.data.ct_rate"]),
    ("def f():\n    from common.data.openi import load_findings_table", ["common.data.openi"]),
    ("import common.data.vindr as v", ["common.data.vindr"]),
    ("from common.data import vindr", ["common.data.vindr"]),
    ("from ..data.openi import silver_entities", ["common.data.openi"]),
    ("from ..data import ct_rate", ["common.data.ct_rate"]),
    ("from common.data.report_text import report_text_batch\nfrom common.data import load_datalist", []),
    ("from common.data.boxes import fuse_boxes_wbf\nfrom common.data.vindr_extra import x", []),
])
def test_the_check_sees_converter_imports(source, bad):
    assert converter_imports(imported_modules(source, "common.engines")) == bad


def test_engines_do_not_import_converters():
    files = sorted(ENGINES.glob("*.py"))
    assert files
    offenders = {}
    for path in files:
        found = converter_imports(imported_modules(path.read_text(encoding="utf-8"), "common.engines"))
        if found:
            offenders[path.relative_to(ROOT).as_posix()] = found
    assert not offenders, (f"engines import dataset converters {offenders}; move what they share into a neutral "
                           "module (common.data.report_text, common.data.findings_table, common.data.boxes)")


def test_unwrap_is_not_defined_in_the_prompt_module():
    tree = ast.parse((ENGINES / "prompt.py").read_text(encoding="utf-8"))
    assert "unwrap" not in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_ultralytics_is_entered_only_through_common_yolo():
    """ultralytics changes the process as it imports (threads, environment, a settings file): every module outside
    ``common/yolo`` that imports it also imports the adapter's ``import_ultralytics`` to do it first."""
    strays = []
    for path in sorted((ROOT / "common").rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        modules = imported_modules(path.read_text(), package)
        if not any(m == "ultralytics" or m.startswith("ultralytics.") for m in modules):
            continue
        if path.parent != ROOT / "common" / "yolo" and "common.yolo.env.import_ultralytics" not in modules:
            strays.append(str(path.relative_to(ROOT)))
    assert strays == []
