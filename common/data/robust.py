"""Per-case error isolation: a bad file becomes a reported failure, not the end of the run."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from monai.data import Dataset
from monai.data.utils import create_file_basename

__all__ = ["ErrorTolerantDataset", "root_cause", "ERROR_KEY", "SOURCE_KEY", "SKIPPED_KEY"]

ERROR_KEY = "error"
SOURCE_KEY = "source"
# set on items refused because their outputs exist (``overwrite`` off): listed as skipped, not as failures
SKIPPED_KEY = "skipped"
logger = logging.getLogger(__name__)


def innermost(e: BaseException) -> BaseException:
    """The innermost cause of an exception chain (MONAI wraps transform errors several times)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def root_cause(e: BaseException) -> str:
    """``Type: message`` of the innermost cause of an exception chain."""
    e = innermost(e)
    return f"{type(e).__name__}: {e}"


class ErrorTolerantDataset(Dataset):
    """A MONAI ``Dataset`` whose failed items come back as ``{"error": message, "source": path}``.

    The message names the item's file and the innermost error, so engines can log and report the case and go on
    with the next one. Use with batch size 1 so a failure never takes good cases of its batch with it.

    Outputs are named after the input's file name (``x.png`` -> ``x_<postfix>``), so two inputs with one name
    (``a/x.nii.gz`` and ``b/x.nii.gz``, or ``x.png`` beside ``x.dcm``) would write the same files: the second and
    later ones fail, naming the input whose outputs they would replace, instead of silently replacing them.

    Args:
        data: the items.
        transform: applied to each item.
        source_key: the item key naming its source in messages and reports. Default ``"image"``; e.g. ``"report"``
            for report datasets.
        name_key: the item key whose value names its outputs (e.g. ``"report_id"``); default None: the source's
            file name.
    """

    def __init__(self, data, transform=None, source_key: str = "image", name_key: str | None = None) -> None:
        super().__init__(data, transform)
        self.source_key = source_key
        first: dict[str, str] = {}
        self.clashes: dict[int, str] = {}
        for index, item in enumerate(self.data):
            source = item.get(source_key) if isinstance(item, Mapping) else None
            if not isinstance(source, str):
                continue
            if name_key is not None:
                name = str(item.get(name_key, source))
            else:
                name = create_file_basename("", source, ".", separate_folder=False)
            if name in first and first[name] != source:
                self.clashes[index] = first[name]
            first.setdefault(name, source)

    def _transform(self, index: int):
        item = self.data[index]
        if index in self.clashes:
            source = str(item[self.source_key])
            message = (f"{source}: its outputs would have the names of those of {self.clashes[index]} in this run; "
                       "rename one of the two files or run them into different output folders.")
            logger.error("skipping case: %s", message)
            return {ERROR_KEY: message, SOURCE_KEY: source}
        try:
            return super()._transform(index)
        except Exception as e:
            source = str(item.get(self.source_key, index)) if isinstance(item, Mapping) else str(index)
            message = f"{source}: {root_cause(e)}"
            if isinstance(innermost(e), FileExistsError):  # outputs exist and overwrite is off: nothing went wrong
                logger.warning("skipping case: %s", message)
                return {ERROR_KEY: message, SOURCE_KEY: source, SKIPPED_KEY: True}
            logger.error("skipping case: %s", message)
            return {ERROR_KEY: message, SOURCE_KEY: source}
