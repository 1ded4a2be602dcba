"""The volume reader of the project: MetaImage and NRRD files, and DICOM series folders, through ITK."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import itk
import pydicom
from monai.data import ITKReader
from monai.utils import ensure_tuple

from common.data.dicom import HEADER_DEFER_SIZE, KEPT_TAGS, dicom_series_files

__all__ = ["VolumeReader", "VOLUME_SUFFIXES"]

PathLike = str | Path

# file formats read through ITK (a ".mhd" or ".nhdr" header names its data file)
VOLUME_SUFFIXES = {".mha": "MetaImage", ".mhd": "MetaImage", ".nrrd": "NRRD", ".nhdr": "NRRD"}


def _itk_message(err: Exception) -> str:
    """ITK's error without its source locations and object addresses."""
    lines = [line.strip() for line in str(err).splitlines()]
    lines = [line.split("): ", 1)[-1] if line.startswith("ITK ERROR:") else line for line in lines]
    return "; ".join(line.rstrip(".") for line in lines if line and not line.startswith("/"))


class VolumeReader(ITKReader):
    """MONAI's :class:`monai.data.ITKReader` for the volumes a bundle may be given: ``.mha``/``.mhd`` (MetaImage),
    ``.nrrd``/``.nhdr`` (NRRD) files and folders holding one DICOM series.

    Layout and affine are ITKReader's: the array is ``(x, y, z)`` (columns, rows, slices for a series) and the affine
    is converted from ITK's LPS to RAS (``affine_lps_to_ras=True``), as ``NibabelReader`` gives NIfTI files, so one
    volume saved in any of these formats loads to the same array and affine after ``EnsureChannelFirstd`` and
    ``Orientationd(axcodes="RAS")``. What changes:

    - ``verify_suffix`` claims only the suffixes above and folders, so NIfTI, PNG and single DICOM files go to
      their readers when several are registered.
    - A folder must hold nothing but the slices of one series forming one regular stack
      (:func:`common.data.dicom.dicom_series_files`, headers only); the slices are given to ITK sorted along the
      slice normal, so neither file names nor InstanceNumber decide the order. Series values are in modality units
      (RescaleSlope/Intercept applied, HU for CT, no window) and the metadata holds the first slice's
      :data:`common.data.dicom.KEPT_TAGS`.
    - Errors are ``ValueError`` (``FileNotFoundError`` for a missing path) starting with the offending path and
      naming the problem.

    Args:
        channel_dim: as ``ITKReader``. Default ``None`` (no channel).
        affine_lps_to_ras: convert the affine from LPS to RAS. Default ``True``.
        kwargs: passed to ``itk.imread`` (e.g. ``pixel_type``).

    Example::

        loader = LoadImage(reader=VolumeReader(), ensure_channel_first=True)
        image = loader("ct.mha")  # MetaTensor (1, X, Y, Z), affine in RAS
    """

    def __init__(self, channel_dim: str | int | None = None, affine_lps_to_ras: bool = True, **kwargs: Any) -> None:
        super().__init__(channel_dim=channel_dim, affine_lps_to_ras=affine_lps_to_ras, **kwargs)

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """``True`` only when every name is a folder or a file with one of :data:`VOLUME_SUFFIXES`."""
        names = [Path(f"{name}") for name in ensure_tuple(filename)]
        return len(names) > 0 and all(p.is_dir() or p.suffix.lower() in VOLUME_SUFFIXES for p in names)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any):
        """Read a file or a series folder (one ITK image); several paths give a list, stacked as channels."""
        kwargs_ = {**self.kwargs, **kwargs}
        images = [self._read_one(Path(f"{name}"), kwargs_) for name in ensure_tuple(data)]
        return images[0] if len(images) == 1 else images

    def _read_one(self, path: Path, kwargs: dict):
        if path.is_dir():
            files = dicom_series_files(path)
            image = self._imread([str(f) for f in files] if len(files) > 1 else str(files[0]), path, kwargs)
            first = pydicom.dcmread(files[0], defer_size=HEADER_DEFER_SIZE)
            meta = image.GetMetaDataDictionary()
            for tag in KEPT_TAGS:
                meta[tag] = str(first.get(tag, "") or "")
            image.SetMetaDataDictionary(meta)
            return image
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (no such file or directory).")
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: file is empty (0 bytes).")
        return self._imread(str(path), path, kwargs)

    @staticmethod
    def _imread(names: str | list[str], path: Path, kwargs: dict):
        kind = "DICOM series" if path.is_dir() else f"{VOLUME_SUFFIXES.get(path.suffix.lower(), 'image')} file"
        try:
            return itk.imread(names, **kwargs)
        except (RuntimeError, ValueError, TypeError) as err:
            # "from None": per-case reports show the innermost error, and this one names the file
            raise ValueError(f"{path}: cannot read as a {kind}: {_itk_message(err)}.") from None
