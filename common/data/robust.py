"""Per-case error isolation: a bad file becomes a reported failure, not the end of the run."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from monai.data import Dataset

__all__ = ["ErrorTolerantDataset", "root_cause", "ERROR_KEY", "SOURCE_KEY"]

ERROR_KEY = "error"
SOURCE_KEY = "source"
logger = logging.getLogger(__name__)


def root_cause(e: BaseException) -> str:
    """The innermost cause of an exception chain (MONAI wraps transform errors several times)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


class ErrorTolerantDataset(Dataset):
    """A MONAI ``Dataset`` whose failed items come back as ``{"error": message, "source": path}``.

    The message names the item's file and the innermost error, so engines can log and report the case and go on
    with the next one. Use with batch size 1 so a failure never takes good cases of its batch with it.
    """

    def _transform(self, index: int):
        item = self.data[index]
        try:
            return super()._transform(index)
        except Exception as e:
            source = str(item.get("image", index)) if isinstance(item, Mapping) else str(index)
            message = f"{source}: {root_cause(e)}"
            logger.error("skipping case: %s", message)
            return {ERROR_KEY: message, SOURCE_KEY: source}
