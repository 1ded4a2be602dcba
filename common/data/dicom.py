"""The one DICOM reader of the project: 2D radiographs and single slices, and 3D CT/MR series in a folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.data import PydicomReader
from monai.utils import MetaKeys, ensure_tuple
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom
try:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
except ImportError:  # pydicom 2.x, which MONAI Label's environment keeps
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

__all__ = ["DicomReader", "read_dicom"]

PathLike = str | Path

# readable tags copied into the metadata; always present (empty when absent) so that batches collate
KEPT_TAGS = (
    "Modality",
    "PhotometricInterpretation",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "BodyPartExamined",
    "ViewPosition",
)


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        return path.is_file() and is_dicom(path)
    except OSError:
        return False


def _is_dicom_path(path: Path) -> bool:
    if path.is_dir():
        return any(_is_dicom_file(p) for p in path.iterdir() if p.is_file())
    return _is_dicom_file(path)


def _dcmread(path: Path, **kwargs: Any) -> pydicom.Dataset:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory.")
    try:
        return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError as err:
        raise ValueError(f"{path}: not a DICOM file ({err}).") from err


def _read_folder(folder: Path, **kwargs: Any) -> tuple[list[pydicom.Dataset], list[str]]:
    """Every DICOM image file directly inside ``folder`` (sub-folders and DICOMDIR indexes are skipped)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and _is_dicom_file(p))
    datasets, names = [], []
    for name in files:
        ds = _dcmread(name, **kwargs)
        if "DirectoryRecordSequence" not in ds:
            datasets.append(ds)
            names.append(str(name))
    if not datasets:
        raise ValueError(f"{folder}: directory contains no DICOM files.")
    return datasets, names


def _decode(ds: pydicom.Dataset, filename: PathLike) -> np.ndarray:
    """The stored values of a single-frame greyscale image, with the file named in every error."""
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ValueError(f"{filename}: DICOM file has no pixel data.")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ValueError(f"{filename}: multi-frame DICOM with {frames} frames; a single frame is expected.")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"{filename}: photometric interpretation '{photometric}'; a greyscale image is expected.")
    try:
        return ds.pixel_array
    except (RuntimeError, NotImplementedError, ValueError, AttributeError) as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        described = f"{syntax.name} ({syntax})" if syntax is not None else "an unknown transfer syntax"
        raise ValueError(f"{filename}: cannot decode pixel data stored as {described}: {err}") from err


def _rescale(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality LUT: stored values to modality units (HU for CT)."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float64)
    # a lone slope or intercept still applies (the other takes its neutral value)
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    return arr.astype(np.float64) * slope + intercept


class DicomReader(PydicomReader):
    """MONAI image reader for DICOM: single images (radiographs, one CT/MR slice) and one series per folder.

    Builds on :class:`monai.data.PydicomReader` (metadata, affine, LPS to RAS, ``swap_ij``) and changes what
    the bundles rely on:

    - ``verify_suffix`` claims only DICOM: a ``.dcm`` file, a file with the ``DICM`` preamble, or a folder
      holding such files, so NIfTI and PNG inputs still go to their readers when several are registered.
    - Pixel values are ``float32`` after the modality LUT (RescaleSlope/Intercept or Modality LUT Sequence).
    - Single images: with ``apply_voi`` the VOI LUT Sequence or WindowCenter/Width is applied next, then
      MONOCHROME1 is inverted (``min + max - x``) so that dense tissue is always bright. The metadata keeps the
      original ``PhotometricInterpretation``; the returned values are always in the MONOCHROME2 sense.
    - Series keep modality units (HU) and are never inverted: slices are sorted by position along the slice
      normal (not by InstanceNumber) and must form one regular stack of one series with one orientation, one
      size and even spacing, or a ``ValueError`` names the folder and the problem.
    - Spacing comes from PixelSpacing, else ImagerPixelSpacing. Radiographs without patient geometry get an
      axis-aligned affine holding that spacing (no LPS/RAS flip, which would turn them upside down).
    - Errors are ``ValueError`` (``FileNotFoundError`` for a missing path) starting with the offending path.

    Layout (as ``PydicomReader``): with ``swap_ij=True`` a single image is ``(W, H)`` (``(x, y)``) and a series
    ``(x, y, z)`` = ``(columns, rows, slices)``; :func:`read_dicom` returns single images as ``(H, W)``.
    Multi-frame files (including DICOM SEG) and colour images are refused.

    Args:
        apply_voi: apply the VOI LUT/window. ``None`` (default): on single images, not on series.
        channel_dim: as ``PydicomReader``. Default ``None`` (no channel).
        affine_lps_to_ras: convert the patient affine from LPS to RAS. Default ``True``.
        swap_ij: put columns first, as the other MONAI readers do. Default ``True``.
        prune_metadata: keep only geometry tags (plus the readable tags above). Default ``True``.
        kwargs: passed to ``pydicom.dcmread`` (e.g. ``force=True`` for files without a preamble).

    Example::

        loader = LoadImage(reader=DicomReader(), ensure_channel_first=True)
        image = loader("CT_small.dcm")  # MetaTensor (1, 128, 128), float32
    """

    def __init__(
        self,
        apply_voi: bool | None = None,
        channel_dim: str | int | None = None,
        affine_lps_to_ras: bool = True,
        swap_ij: bool = True,
        prune_metadata: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            channel_dim=channel_dim,
            affine_lps_to_ras=affine_lps_to_ras,
            swap_ij=swap_ij,
            prune_metadata=prune_metadata,
            to_gpu=False,
            **kwargs,
        )
        if apply_voi not in (None, True, False):
            raise ValueError(f"apply_voi should be None, True or False, got {apply_voi}.")
        self.apply_voi = apply_voi

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """``True`` only when every name is a DICOM file or a folder holding DICOM files."""
        names = ensure_tuple(filename)
        return len(names) > 0 and all(_is_dicom_path(Path(f"{name}")) for name in names)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any):
        """Read a file (one dataset) or a folder (a list of datasets: a series; one dataset if it holds one file).

        Several paths give a list of those, stacked as channels by ``get_data``; they must all be series or all
        single images.
        """
        kwargs_ = {**self.kwargs, **kwargs}
        images: list = []
        self.filenames = []
        for name in ensure_tuple(data):
            path = Path(f"{name}")
            if path.is_dir():
                datasets, names = _read_folder(path, **kwargs_)
                images.append(datasets if len(datasets) > 1 else datasets[0])
                self.filenames.append(names if len(names) > 1 else names[0])
            else:
                images.append(_dcmread(path, **kwargs_))
                self.filenames.append(str(path))
        kinds = {isinstance(image, list) for image in images}
        if len(kinds) > 1:
            raise ValueError(f"{ensure_tuple(data)}: cannot stack series and single images together.")
        self.has_series = kinds == {True}
        return images[0] if len(images) == 1 else images

    def _get_array_data(self, img, filename):
        arr = _rescale(_decode(img, filename), img)
        apply_voi = not self.has_series if self.apply_voi is None else self.apply_voi
        if apply_voi:
            arr = apply_voi_lut(arr, img)
        # quantitative series keep their units; only projection images are flipped to "dense is bright"
        if not self.has_series and img.get("PhotometricInterpretation") == "MONOCHROME1":
            arr = arr.max() + arr.min() - arr
        return np.asarray(arr, dtype=np.float32)

    def _get_meta_dict(self, img) -> dict:
        meta = super()._get_meta_dict(img)
        if "00280030" not in meta and "ImagerPixelSpacing" in img:
            meta["00280030"] = {"vr": "DS", "Value": [float(v) for v in img.ImagerPixelSpacing]}
        for tag in KEPT_TAGS:
            meta[tag] = str(img.get(tag, "") or "")
        return meta

    def _get_affine(self, metadata: dict, lps_to_ras: bool = True):
        if "00200037" in metadata and "00200032" in metadata:
            return super()._get_affine(metadata, lps_to_ras)
        # no patient geometry (CR/DX): rows along y, columns along x, as ImageOrientationPatient (1,0,0,0,1,0)
        row_spacing, col_spacing = metadata["00280030"]["Value"][:2] if "00280030" in metadata else (1.0, 1.0)
        affine = np.eye(4)
        affine[0, 0], affine[0, 1] = 0.0, float(col_spacing)
        affine[1, 0], affine[1, 1] = float(row_spacing), 0.0
        return affine

    def _combine_dicom_series(self, data, filenames):
        slices = list(zip(data, filenames))
        folder = Path(f"{filenames[0]}").parent
        _check_one_stack(slices, folder)
        orientation = np.asarray(slices[0][0].ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        positions = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)) for ds, _ in slices])
        order = np.argsort(positions, kind="stable")
        slices, gaps = [slices[i] for i in order], np.diff(positions[order])
        if gaps.min() < 1e-3:
            raise ValueError(f"{folder}: two slices share a position; is more than one acquisition in the folder?")
        if not np.allclose(gaps, gaps.mean(), rtol=0.01, atol=1e-3):
            raise ValueError(f"{folder}: slice spacing varies from {gaps.min():.4g} to {gaps.max():.4g} mm "
                             "(missing slices?).")
        stack = np.stack([self._get_array_data(ds, name) for ds, name in slices], axis=-1)
        first, last = slices[0][0], slices[-1][0]
        meta = self._get_meta_dict(first)
        in_plane = [float(v) for v in first.get("PixelSpacing") or (1.0, 1.0)]
        meta["spacing"] = np.asarray([*in_plane, float(gaps.mean())])
        meta["lastImagePositionPatient"] = np.asarray(last.ImagePositionPatient, dtype=float)
        meta[MetaKeys.SPATIAL_SHAPE] = stack.shape
        return stack, meta


def _check_one_stack(slices: list[tuple[pydicom.Dataset, str]], folder: Path) -> None:
    """Refuse folders that are not one series of parallel, equally sized slices (checked before decoding)."""
    series = {str(ds.get("SeriesInstanceUID", "")) for ds, _ in slices}
    if len(series) > 1:
        raise ValueError(f"{folder}: holds {len(series)} series; put one series per folder.")
    for ds, name in slices:
        if "PixelData" not in ds:
            raise ValueError(f"{name}: DICOM file has no pixel data.")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient"):
            if tag not in ds:
                raise ValueError(f"{name}: slice of a series has no {tag}.")
    orientation = np.asarray(slices[0][0].ImageOrientationPatient, dtype=float)
    if any(not np.allclose(ds.ImageOrientationPatient, orientation, atol=1e-4) for ds, _ in slices):
        raise ValueError(f"{folder}: slices have different ImageOrientationPatient; not one stack.")
    sizes = {(ds.get("Rows"), ds.get("Columns")) for ds, _ in slices}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: slices have different sizes {sorted(sizes)}.")


def read_dicom(path: PathLike, apply_voi: bool | None = None) -> tuple[np.ndarray, dict]:
    """Read a DICOM file or a folder holding one series, for converters and scripts.

    Args:
        path: a DICOM file, or a folder with the files of one series (a folder with one file reads as that file).
        apply_voi: as :class:`DicomReader`; ``None`` (default) windows single images and leaves series in
            modality units.

    Returns:
        ``(array, meta)``: a ``float32`` array ``(H, W)`` for a single image or ``(x, y, z)`` (MONAI's layout,
        columns first) for a series, and its metadata with ``affine`` (matching the returned axes), ``spacing``,
        ``spatial_shape``, the tags in ``KEPT_TAGS`` and ``filename_or_obj``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not DICOM, no pixel data, undecodable transfer syntax, multi-frame, colour, empty folder, or a
            folder that is not one regular series; the message starts with the path.
    """
    path = Path(path)
    reader = DicomReader(apply_voi=apply_voi)
    data = reader.read(path)
    # single images keep numpy's (rows, columns) order; series take MONAI's (x, y, z)
    reader.swap_ij = reader.has_series
    array, meta = reader.get_data(data)
    meta["filename_or_obj"] = str(path)
    return array, meta
