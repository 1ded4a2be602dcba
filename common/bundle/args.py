"""Command-line values: the one boolean coercion, and the check of a bundle run's overrides against its configs.

MONAI's runner (``python -m monai.bundle run``) and ``python -m common.cli`` parse their arguments with ``fire``,
which turns ``--overwrite False`` into ``False`` but passes ``--overwrite false`` on as the string ``'false'``,
a truthy value. Every boolean a config id or a CLI flag carries goes through :func:`as_bool`, and
:func:`check_command_line` (the first item of every bundle config's ``run``) refuses an override that names
no id of the configs, or that gives a boolean id something that is not a boolean.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BOOLEAN_WORDS", "as_bool", "check_command_line", "config_files", "config_ids", "is_bundle_runner", "is_off",
    "parse_overrides", "user_error",
]

# the spellings accepted for a boolean, compared case-insensitively
BOOLEAN_WORDS = {
    "true": True, "yes": True, "on": True, "1": True,
    "false": False, "no": False, "off": False, "0": False,
}


def as_bool(value: Any, name: str = "value") -> bool:
    """``value`` as a boolean: ``True``/``False``, 0/1, or one of ``true/false/yes/no/on/off/1/0`` in any case.

    Args:
        value: what a config or the command line holds.
        name: the id or flag it came from, named in the error.

    Raises:
        ValueError: anything else (``'maybe'``, ``2``, ``None``), naming ``name``.

    Example:
        >>> as_bool("False", "overwrite"), as_bool("on", "clahe"), as_bool(1, "amp")
        (False, True, True)
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # also numpy/torch integers that compare equal
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[value.strip().lower()]
    raise ValueError(f"{name} should be a boolean (true/false, yes/no, on/off, 1/0), got {value!r}.")


def is_off(value: Any, name: str = "value") -> bool:
    """``not as_bool(value, name)``: a flag's negation for configs, e.g. ``"_disabled_": {"_target_":
    "common.bundle.args.is_off", "value": "@clahe", "name": "clahe"}`` (a component rather than a ``$`` expression, so
    packaged bundles resolve it once their code is importable)."""
    return not as_bool(value, name)


def parse_overrides(argv: Sequence[str]) -> dict[str, str]:
    """``--key value`` and ``--key=value`` pairs of a command line, as the strings given (a flag without a value
    maps to ``'true'``, as fire reads it)."""
    pairs: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = argv[i + 1], i + 1
                else:
                    value = "true"
            pairs[key] = value
        i += 1
    return pairs


def config_ids(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every id of a config (``a``, ``a#b``, ``a#0``) with its value, in ``#`` notation as overrides name them."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        name = f"{prefix}#{key}" if prefix else str(key)
        yield name, value
        yield from config_ids(value, name)


def _runner_arguments() -> set[str]:
    """Arguments MONAI's runner and ``ConfigWorkflow`` take themselves (not config ids)."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.scripts import create_workflow, run

    names = {"workflow_name", "workflow_type", "args_file"}
    for fn in (run, create_workflow, ConfigWorkflow.__init__):
        names |= {p.name for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD}
    return names - {"self"}


def config_files(value: str) -> list[str]:
    """The config file paths of a ``--config_file`` value: one path, comma-separated paths or a Python list."""
    files = ast.literal_eval(value) if value.lstrip().startswith(("[", "(")) else value.split(",")
    return [str(f).strip() for f in ([files] if isinstance(files, str) else files)]


def is_bundle_runner(argv: Sequence[str] | None = None) -> bool:
    """Whether this process is ``python -m monai.bundle run ...`` (also under ``torchrun``)."""
    argv = list(sys.argv if argv is None else argv)
    return len(argv) >= 2 and Path(argv[0]).parts[-2:] == ("bundle", "__main__.py") and argv[1] == "run"


def user_error(message: str, error: type[Exception] = RuntimeError) -> BaseException:
    """The exception to raise for a problem the user must fix: ``SystemExit(message)`` in MONAI's runner, so the
    message is the last line printed and the exit status is 1 (MONAI wraps other exceptions raised while a config
    runs in chained tracebacks that bury it), ``error(message)`` elsewhere (workflows built in Python, MONAI Label).
    """
    return SystemExit(message) if is_bundle_runner() else error(message)


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Refuse a ``python -m monai.bundle run`` command line whose overrides the configs would silently ignore or
    misread: an id that no config file defines (a misspelling such as ``--querys``), or a boolean id given a value
    that is not a boolean. The configs call it first in ``run`` (where a packaged bundle's code is importable), before
    any case or epoch; elsewhere (a workflow built in Python,
    ``torchrun`` runs it the same way) it only checks when the process is MONAI's runner.

    Args:
        argv: a full command line (``sys.argv`` layout). Default ``sys.argv``.

    Raises:
        SystemExit: with one line naming the id, the problem and the known ids, so the message is the last line the
            user sees (MONAI wraps exceptions raised while a config runs in long chained tracebacks).
    """
    argv = list(sys.argv if argv is None else argv)
    if not is_bundle_runner(argv):
        return
    from monai.bundle import ConfigParser

    overrides = parse_overrides(argv[2:])
    if "config_file" not in overrides:
        return
    files = config_files(overrides["config_file"])
    parser = ConfigParser()
    parser.read_config(files)
    defaults = dict(config_ids(parser.get()))
    reserved = _runner_arguments()
    unknown = [key for key in overrides if key not in reserved and key not in defaults]
    if unknown:
        top = sorted(k for k in defaults if "#" not in k and not k.startswith("_"))
        hints = [f"'--{k}'" + (f" (did you mean '--{m[0]}'?)" if (m := difflib.get_close_matches(k, top, 1)) else "")
                 for k in unknown]
        raise SystemExit(
            f"{', '.join(files)}: unknown config id(s) {', '.join(hints)}; known ids: {', '.join(top)} "
            "(nested ids as 'parent#child')."
        )
    for key, value in overrides.items():
        if isinstance(defaults.get(key), bool):
            try:
                as_bool(value, f"--{key}")
            except ValueError as e:
                raise SystemExit(f"{', '.join(files)}: {e}") from None
