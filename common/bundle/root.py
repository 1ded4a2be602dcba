"""Where a bundle lives, for configs run by ``python -m monai.bundle run`` from any working directory."""

from __future__ import annotations

import ast
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["bundle_root"]


def bundle_root(default: str = ".", argv: Sequence[str] | None = None) -> str:
    """The bundle folder of the config files this process was started with.

    MONAI's runner does not tell a config where it lives, so a config's ``"bundle_root": "."`` means the working
    directory. The configs' ``bundle_root`` item calls this instead, so that
    ``python -m monai.bundle run --config_file bundles/<name>/configs/inference.json`` finds the bundle's weights
    and sample from the repository root (or anywhere): ``<bundle>/configs/x.json`` -> ``<bundle>``. Giving
    ``--bundle_root`` on the command line, or ``bundle_root`` to a ``ConfigWorkflow``, replaces that item.

    Args:
        default: returned when the command line has no ``--config_file`` (e.g. a workflow built in Python).
        argv: command-line arguments to read. Default ``sys.argv[1:]``.

    Returns:
        The folder holding the first config file's ``configs/`` folder (or the config's own folder when it is
        not named ``configs``), as given on the command line (relative paths stay relative).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    value = None
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value is not None:
            break
    if not value:
        return default
    files = ast.literal_eval(value) if value.lstrip().startswith(("[", "(")) else value.split(",")
    folder = Path(str(files[0]).strip()).parent
    return str(folder.parent if folder.name == "configs" else folder)
