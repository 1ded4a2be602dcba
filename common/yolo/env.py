"""The one way into ultralytics: offline, with a font in place, leaving the process's threads and environment alone.

Only the detector's code path calls :func:`import_ultralytics`; no package ``__init__`` of ``common`` imports this
module's target, so the other bundles never load ultralytics. Importing it has side effects this module undoes or
prevents:

- ``ultralytics/__init__`` sets ``OMP_NUM_THREADS=1`` (and ``ultralytics.utils`` a few logging variables) in
  ``os.environ`` when unset, which every later child process would inherit: the variables are restored.
- its ``select_device`` (trainer, predictor) calls ``torch.set_num_threads(min(8, cpu_count - 1))``: callers wrap
  such calls in :func:`keep_torch_threads`.
- it reads and writes a settings file under ``$YOLO_CONFIG_DIR/Ultralytics`` (the home directory when unset): the
  variable is pointed at a private folder first, and the plotting font that ultralytics would otherwise download
  (``Arial.ttf``) is copied there from matplotlib's bundled DejaVu Sans.
- it sets numpy's and torch's print options and ``cv2.setNumThreads(0)``: restored after the import;
- its trainer switches torch's deterministic algorithms on and, when done, off and removes ``PYTHONHASHSEED`` and
  ``CUBLAS_WORKSPACE_CONFIG`` from the environment: :func:`keep_process_state` restores all of it.
- ``ultralytics.utils.patches`` replaces ``PIL.Image.open`` with a version that, on the first file Pillow cannot
  identify, installs a HEIF plugin and retries: offline that raises ``ModuleNotFoundError: pi_heif`` in place of
  Pillow's error, so a damaged PNG read by the shared reader in the same process was no longer named as such. The
  collection reads no HEIF: Pillow's own ``open`` is put back.
- ``YOLO_OFFLINE=1`` turns its online checks (``is_online``, analytics events, update checks) off and
  ``YOLO_AUTOINSTALL=false`` stops ``check_requirements`` from running pip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import PIL.Image
import torch

__all__ = ["ensure_font", "import_ultralytics", "keep_process_state", "keep_torch_threads", "yolo_config_dir"]

FONT_NAME = "Arial.ttf"
_OWN_VARIABLES = ("YOLO_CONFIG_DIR", "YOLO_OFFLINE", "YOLO_AUTOINSTALL")


def yolo_config_dir(fallback: str | os.PathLike | None = None) -> Path:
    """The folder ultralytics keeps its settings in: ``$YOLO_CONFIG_DIR`` when set, else ``fallback`` (e.g. a run's
    output folder), else a per-user folder under the system's temporary directory; never the home directory."""
    if os.environ.get("YOLO_CONFIG_DIR"):
        return Path(os.environ["YOLO_CONFIG_DIR"])
    if fallback is not None:
        return Path(fallback)
    return Path(tempfile.gettempdir()) / f"cib-ultralytics-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def ensure_font(config_dir: str | os.PathLike) -> Path:
    """Copy matplotlib's DejaVu Sans to ``config_dir/Ultralytics/Arial.ttf`` unless a font is there already.

    Ultralytics' ``check_font`` looks there first and downloads Arial from its asset server when the file is missing.
    """
    import matplotlib

    target = Path(config_dir) / "Ultralytics" / FONT_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(source, partial)
        partial.replace(target)  # atomic: parallel processes never see half a font
    return target


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore ``torch.get_num_threads()`` on exit (ultralytics' ``select_device`` lowers it on CPU)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _restore_environment(before: dict[str, str], keep: tuple[str, ...] = _OWN_VARIABLES) -> None:
    for name in set(os.environ) - set(before):
        if name not in keep:
            del os.environ[name]
    for name, value in before.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


@contextlib.contextmanager
def keep_process_state() -> Iterator[None]:
    """Restore torch's threads and deterministic-algorithm settings and the environment variables on exit, around
    ultralytics' training or prediction."""
    before = dict(os.environ)
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
                     torch.utils.deterministic.fill_uninitialized_memory)
    try:
        with keep_torch_threads():
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.deterministic = deterministic[2]
        torch.utils.deterministic.fill_uninitialized_memory = deterministic[3]
        _restore_environment(before)


def _restore_pil_open() -> None:
    """Put Pillow's own ``Image.open`` back in place of ultralytics' HEIF-retrying one (see the module docstring)."""
    import ultralytics.utils.patches as patches

    if PIL.Image.open is patches.image_open:
        PIL.Image.open = patches._image_open


def import_ultralytics(config_dir: str | os.PathLike | None = None) -> ModuleType:
    """Import ultralytics offline, with its settings in :func:`yolo_config_dir` and a local font.

    Args:
        config_dir: settings folder used when ``YOLO_CONFIG_DIR`` is unset (it is then set to this, so child
            processes such as DDP workers share it). Default: a per-user folder in the temporary directory.

    Returns:
        The ``ultralytics`` module.
    """
    folder = yolo_config_dir(config_dir)
    os.environ["YOLO_CONFIG_DIR"] = str(folder)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    ensure_font(folder)
    if "ultralytics" in sys.modules:
        _restore_pil_open()  # imported elsewhere first (e.g. by ``from ultralytics import YOLO``)
        return sys.modules["ultralytics"]
    import cv2
    import numpy as np

    before, cv2_threads, numpy_print = dict(os.environ), cv2.getNumThreads(), np.get_printoptions()
    torch_print = vars(torch._tensor_str.PRINT_OPTS).copy()
    with keep_torch_threads():
        import ultralytics
        import ultralytics.utils  # noqa: F401  (its import edits the environment too)
    _restore_pil_open()
    _restore_environment(before)
    cv2.setNumThreads(cv2_threads)
    np.set_printoptions(**numpy_print)
    for name, value in torch_print.items():
        setattr(torch._tensor_str.PRINT_OPTS, name, value)
    return ultralytics
