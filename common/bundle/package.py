"""Package a bundle of this collection as a standard MONAI bundle zip that runs without this repository.

The zip is what ``python -m monai.bundle download --name <name> --url <url-of-zip>`` accepts: one top folder named
after the bundle, extracted as is into ``bundle_dir``. It holds the bundle's ``configs/``, ``docs/``, ``sample/``,
``LICENSE`` and ``models/model.pt``, plus:

- ``scripts/common/``: the part of the shared package ``common`` the configs need, vendored. The modules are found
  by following every ``common.`` reference of the configs (``_target_`` values and ``$`` expressions) to the module
  that defines the name, then that module's imports, transitively (imports inside functions included, so lazily
  imported pieces such as the YOLO path come along), with Python's ``ast``. A package's ``__init__.py`` keeps only
  the re-exports of vendored submodules, so importing ``scripts.common.networks`` does not import networks the
  bundle never uses (nor their third-party packages).
- configs rewritten from ``common.<...>`` to ``scripts.common.<...>``; imports of ``common`` inside the vendored code
  become relative imports, so the copy resolves only itself. ``scripts`` is the model-zoo's place for a bundle's
  code, and MONAI's runner puts the bundle root on ``sys.path`` when a workflow runs; a nested ``scripts.common``
  rather than a top-level ``common`` keeps the copy from shadowing, or being shadowed by, another package named
  ``common`` in the application that loads the bundle. Like every model-zoo bundle with code, a packaged bundle owns
  the top-level name ``scripts``, so one Python process imports one of them.
- ``configs/metadata.json`` with ``required_packages_version`` naming the installed version of every third-party
  distribution the vendored code imports, plus the packages the bundle already listed; this repository's own
  distribution is dropped (its code is inside).
- ``large_files.yml`` (MONAI's large-files format: ``path``, ``url``, ``hash_val``, ``hash_type``) naming
  ``models/model.pt`` with its sha256, so ``python -m monai.bundle download_large_files`` can verify or fetch it.

The source bundle is never modified: everything is assembled in a temporary folder.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .validate import validate_metadata

__all__ = ["BUNDLE_FILES", "VENDOR_PACKAGE", "find_config_references", "package_bundle", "vendored_modules"]

PACKAGE = "common"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# Where the vendored copy lives inside the packaged bundle, as a dotted name relative to the bundle root.
SCRIPTS = "scripts"
VENDOR_PACKAGE = f"{SCRIPTS}.{PACKAGE}"
# Copied from the source bundle when present (configs/ and models/model.pt are required and handled apart; other
# models/*.pt files, such as the CT encoder's text.pt, are copied beside model.pt).
BUNDLE_FILES = ("docs", "sample", "LICENSE")
WEIGHTS = "models/model.pt"
# Pinned by metadata's own fields (monai_version, pytorch_version, numpy_version) rather than the package list.
_PINNED_ELSEWHERE = {"monai", "torch", "numpy"}
_REFERENCE = re.compile(rf"(?<![\w.]){PACKAGE}(?:\.\w+)+")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


class _Sources:
    """The modules of a package on disk, their imports, and which submodule defines a re-exported name."""

    def __init__(self, package_dir: Path, package: str):
        self.package = package
        self.files: dict[str, Path] = {}
        for path in sorted(package_dir.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(package_dir).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            self.files[".".join((package, *parts))] = path
        self._trees: dict[str, ast.Module] = {}

    def is_package(self, module: str) -> bool:
        return self.files[module].name == "__init__.py"

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            path = self.files[module]
            self._trees[module] = ast.parse(path.read_text(), filename=str(path))
        return self._trees[module]

    def parent_package(self, module: str) -> str:
        return module if self.is_package(module) else module.rpartition(".")[0]

    def absolute(self, module: str, node: ast.ImportFrom) -> str:
        """The absolute name ``node`` imports from, inside ``module``."""
        if not node.level:
            return node.module or ""
        base = self.parent_package(module).split(".")
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def owns(self, name: str) -> bool:
        return name == self.package or name.startswith(self.package + ".")

    def reexports(self, package: str) -> list[tuple[ast.ImportFrom, str]]:
        """Top-level ``from .sub import ...`` statements of a package's ``__init__`` and the submodule each reads."""
        found = []
        for node in self.tree(package).body:
            if isinstance(node, ast.ImportFrom):
                target = self.absolute(package, node)
                if target.startswith(package + ".") and target in self.files:
                    found.append((node, target))
        return found

    def defining_module(self, module: str, name: str) -> set[str]:
        """Modules needed to get attribute ``name`` of ``module``: the submodule itself, or the one a package
        re-exports it from (followed through nested packages)."""
        if f"{module}.{name}" in self.files:
            return {f"{module}.{name}"}
        if not self.is_package(module):
            return set()
        for node, target in self.reexports(module):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return {target} | self.defining_module(target, alias.name)
        return set()

    def defines(self, module: str, name: str) -> bool:
        """Whether ``module`` binds ``name`` at its top level (definition, assignment or import)."""
        for node in self.tree(module).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return True
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                    return True
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        return False

    def resolve(self, dotted: str) -> set[str]:
        """Modules needed by a dotted reference such as ``common.networks.iris_small``; empty when nothing in the
        package defines it."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            module = ".".join(parts[:end])
            if module not in self.files:
                continue
            if end == len(parts):
                return {module}
            found = self.defining_module(module, parts[end])
            return {module} | found if found or self.defines(module, parts[end]) else set()
        return set()

    def imports(self, module: str, needed: set[str]) -> tuple[set[str], set[str]]:
        """Modules of the package and third-party top-level names that ``module`` imports when ``needed`` is
        vendored (re-exports of unvendored submodules in a package ``__init__`` are dropped, so not followed)."""
        optional = {id(node) for node, target in self.reexports(module) if target not in needed} \
            if self.is_package(module) else set()
        internal, external = set(), set()
        for node in ast.walk(self.tree(module)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if self.owns(alias.name):
                        raise ValueError(
                            f"{self.files[module]}:{node.lineno}: 'import {alias.name}' cannot be vendored; "
                            f"use 'from {alias.name.rpartition('.')[0] or alias.name} import ...'."
                        )
                    external.add(alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and id(node) not in optional:
                target = self.absolute(module, node)
                if not self.owns(target):
                    if not node.level and target != "__future__":
                        external.add(target.split(".")[0])
                    continue
                internal |= self.resolve(target)
                for alias in node.names:
                    internal |= self.defining_module(target, alias.name) if target in self.files else set()
        return internal, external


def _with_parents(modules: set[str]) -> set[str]:
    full = set(modules)
    for module in modules:
        parts = module.split(".")
        full |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return full


def _closure(sources: _Sources, roots: set[str]) -> tuple[set[str], set[str]]:
    """Every module needed to import ``roots`` (parents included) and the third-party top-level names they use."""
    needed = _with_parents(roots)
    while True:
        internal, external = set(), set()
        for module in sorted(needed):
            found, names = sources.imports(module, needed)
            internal |= found
            external |= names
        grown = _with_parents(needed | internal)
        if grown == needed:
            return needed, external
        needed = grown


def _strings(value: Any) -> Iterator[tuple[str | None, str]]:
    """(key, string) for every string in a parsed config, the key being the mapping key it sits under."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, str):
                yield k, v
            else:
                yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from ((None, v),) if isinstance(v, str) else _strings(v)


def _is_code(key: str | None, text: str) -> bool:
    return key == "_target_" or text.startswith("$")


def find_config_references(config: Any) -> set[str]:
    """Dotted ``common.<...>`` names a parsed config uses in ``_target_`` values and ``$`` expressions."""
    return {m.group(0) for key, text in _strings(config) if _is_code(key, text) for m in _REFERENCE.finditer(text)}


def _rewrite_config(value: Any, key: str | None = None) -> Any:
    if isinstance(value, dict):
        return {k: _rewrite_config(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite_config(v) for v in value]
    if isinstance(value, str) and _is_code(key, value):
        return _REFERENCE.sub(lambda m: f"{SCRIPTS}.{m.group(0)}", value)
    return value


def vendored_modules(
    configs: list[Any], package_dir: str | Path = PACKAGE_DIR, package: str = PACKAGE
) -> tuple[set[str], set[str]]:
    """The modules of ``package`` that ``configs`` need, and the third-party top-level names those modules import.

    Raises:
        ValueError: a config names something under ``package`` that no module defines.
    """
    sources = _Sources(Path(package_dir), package)
    roots = set()
    for reference in sorted(set().union(*(find_config_references(c) for c in configs))):
        found = sources.resolve(reference)
        if not found:
            raise ValueError(f"'{reference}' is not a module of {package}.")
        roots |= found
    needed, external = _closure(sources, roots)
    stdlib = set(sys.stdlib_module_names)
    return needed, {name for name in external if name not in stdlib}


def _vendored_source(sources: _Sources, module: str, needed: set[str]) -> str:
    """The module's text with unvendored re-exports removed and absolute imports of the package made relative."""
    lines = sources.files[module].read_text().splitlines(keepends=True)
    drop = set()
    if sources.is_package(module):
        for node, target in sources.reexports(module):
            if target not in needed:
                drop |= set(range(node.lineno - 1, node.end_lineno))
    dots = "." * len(sources.parent_package(module).split("."))
    absolute = re.compile(rf"from\s+{sources.package}((?:\.\w+)*)\s+import")
    for node in ast.walk(sources.tree(module)):
        if isinstance(node, ast.ImportFrom) and not node.level and sources.owns(node.module or ""):
            i = node.lineno - 1
            head, tail = lines[i][: node.col_offset], lines[i][node.col_offset:]
            lines[i] = head + absolute.sub(lambda m: f"from {dots}{m.group(1)[1:]} import", tail, count=1)
    return "".join(line for i, line in enumerate(lines) if i not in drop)


def _distributions(top_level: set[str]) -> dict[str, str]:
    """Installed distribution name -> version for third-party top-level module names (unknown ones are skipped)."""
    mapping = importlib.metadata.packages_distributions()
    found = {}
    for name in sorted(top_level - _PINNED_ELSEWHERE):
        for dist in mapping.get(name, []):
            found[dist] = importlib.metadata.version(dist)
    return found


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _required_packages(listed: dict[str, str], third_party: set[str]) -> dict[str, str]:
    own = {dist.lower() for dist in importlib.metadata.packages_distributions().get(PACKAGE, [])}
    packages = {}
    for dist, version in listed.items():
        if dist.lower() not in own:
            packages[dist] = _installed_version(dist) or version
    lower = {d.lower() for d in packages}
    for dist, version in _distributions(third_party).items():
        if dist.lower() not in own and dist.lower() not in lower:
            packages[dist] = version
    return packages


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _large_files(weights: Path, url: str) -> str:
    return (
        "large_files:\n"
        f'  - path: "{WEIGHTS}"\n'
        f'    url: "{url}"\n'
        f'    hash_val: "{_sha256(weights)}"\n'
        '    hash_type: "sha256"\n'
    )


def _check_source(root: Path) -> None:
    name = root.name
    if not root.is_dir():
        raise FileNotFoundError(f"bundle '{name}': no bundle folder at {root}.")
    for rel in ("configs/metadata.json", "configs/inference.json", WEIGHTS):
        if not (root / rel).is_file():
            hint = " (train the bundle or copy its weights there first)" if rel == WEIGHTS else ""
            raise FileNotFoundError(f"bundle '{name}': {rel} is missing{hint}.")
    if (root / SCRIPTS / PACKAGE).exists():
        raise ValueError(f"bundle '{name}': {SCRIPTS}/{PACKAGE} exists and would clash with the vendored package.")
    try:
        validate_metadata(root / "configs" / "metadata.json")
    except ValueError as e:
        raise ValueError(f"bundle '{name}': {e}") from e


def _read_configs(root: Path) -> dict[str, Any]:
    configs = {}
    for path in sorted((root / "configs").glob("*.json")):
        if path.name == "metadata.json":
            continue
        try:
            configs[path.name] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"bundle '{root.name}': configs/{path.name} is not valid JSON: {e}") from e
    return configs


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=4) + "\n")


def _stage(root: Path, stage: Path, weights_url: str) -> None:
    """Assemble the packaged bundle in ``stage`` (a folder named after the bundle)."""
    name = root.name
    shutil.copytree(root / "configs", stage / "configs", ignore=_IGNORED)
    for rel in (*BUNDLE_FILES, SCRIPTS):
        source = root / rel
        if source.is_dir():
            shutil.copytree(source, stage / rel, ignore=_IGNORED)
        elif source.is_file():
            shutil.copy2(source, stage / rel)
    (stage / "models").mkdir()
    shutil.copy2(root / WEIGHTS, stage / WEIGHTS)
    for extra in sorted((root / "models").glob("*.pt")):  # weights beside the network's, e.g. the CT text tower's
        if extra.name != Path(WEIGHTS).name:
            shutil.copy2(extra, stage / "models" / extra.name)

    configs = _read_configs(root)
    try:
        needed, third_party = vendored_modules(list(configs.values()))
    except ValueError as e:
        raise ValueError(f"bundle '{name}': {e}") from e
    sources = _Sources(PACKAGE_DIR, PACKAGE)
    scripts = stage / SCRIPTS
    scripts.mkdir(exist_ok=True)
    if not (scripts / "__init__.py").exists():
        (scripts / "__init__.py").write_text(
            f'"""Code of the {name} bundle; ``{PACKAGE}/`` is the vendored part of the shared package."""\n'
        )
    for module in sorted(needed):
        rel = sources.files[module].relative_to(PACKAGE_DIR)
        target = scripts / PACKAGE / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_vendored_source(sources, module, needed))
    for file_name, config in configs.items():
        _write_json(stage / "configs" / file_name, _rewrite_config(config))

    meta = json.loads((root / "configs" / "metadata.json").read_text())
    meta["required_packages_version"] = _required_packages(meta.get("required_packages_version", {}), third_party)
    _write_json(stage / "configs" / "metadata.json", meta)
    (stage / "large_files.yml").write_text(_large_files(stage / WEIGHTS, weights_url))


def package_bundle(
    bundle_dir: str | Path, out_dir: str | Path, overwrite: bool = False, weights_url: str = ""
) -> Path:
    """Write ``<out_dir>/<bundle name>.zip``, a MONAI bundle that runs without this repository.

    Args:
        bundle_dir: the bundle's root folder (``bundles/<name>``); it is only read.
        out_dir: folder of the zip, created when missing.
        overwrite: replace an existing zip. Default ``False``.
        weights_url: where ``models/model.pt`` can be downloaded from, recorded in ``large_files.yml``. Default
            empty: the weights travel inside the zip and ``download_large_files`` only checks their hash.

    Returns:
        The path of the zip.

    Raises:
        FileNotFoundError: the bundle, its metadata, inference config or ``models/model.pt`` is missing.
        FileExistsError: the zip exists and ``overwrite`` is ``False``.
        ValueError: the metadata is invalid or a config names something ``common`` does not define.
    """
    root = Path(bundle_dir).resolve()
    _check_source(root)
    out = Path(out_dir).resolve()
    target = out / f"{root.name}.zip"
    if target.exists() and not overwrite:
        raise FileExistsError(f"bundle '{root.name}': {target} exists; pass overwrite=True to replace it.")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{root.name}-package-") as tmp:
        stage = Path(tmp) / root.name
        stage.mkdir()
        _stage(root, stage, weights_url)
        partial = Path(tmp) / target.name
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(stage.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(stage.parent).as_posix())
        shutil.move(partial, target)
    return target
