"""Where a bundle lives, for configs run by ``python -m monai.bundle run`` from any working directory."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from common.bundle.args import config_files, parse_overrides

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
    value = parse_overrides(sys.argv[1:] if argv is None else argv).get("config_file")
    if not value:
        return default
    folder = Path(config_files(value)[0]).parent
    return str(folder.parent if folder.name == "configs" else folder)
