"""The one DICOM reader of the project: 2D radiographs and single slices, and the rules for DICOM series folders.

Single files are read here with pydicom (:class:`DicomReader`). A folder holding one series is a volume: this module
decides what is a series and checks it (:func:`is_dicom_series`, :func:`dicom_series_files`), and
:class:`common.data.volume.VolumeReader` reads it with ITK, as it reads MetaImage and NRRD volumes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.data import PydicomReader
from monai.utils import ensure_tuple
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom
try:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
except ImportError:  # pydicom 2.x, which MONAI Label's environment keeps
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

__all__ = ["DicomReader", "read_dicom", "is_dicom_file", "is_dicom_series", "dicom_series_files", "KEPT_TAGS"]

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
# values above this size are skipped, not read, when only the header of a slice is needed
HEADER_DEFER_SIZE = 1024
_UNDEFINED_LENGTH = 0xFFFFFFFF


def is_dicom_file(path: PathLike) -> bool:
    """Whether ``path`` names a DICOM file: a ``.dcm`` name (even if missing) or a file with the ``DICM`` preamble."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        return path.is_file() and is_dicom(path)
    except OSError:
        return False


def _folder_files(folder: Path) -> list[Path]:
    """The files directly inside ``folder``, hidden ones (``.DS_Store``...) left out; sub-folders are not files."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _dcmread(path: Path, **kwargs: Any) -> pydicom.Dataset:
    """``pydicom.dcmread`` with every failure a one-line error starting with the path and naming the problem."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (no such file or directory).")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: file is empty (0 bytes).")
    # "from None": per-case reports show the innermost error, and these ones name the file
    try:
        ds = pydicom.dcmread(path, **kwargs)
    except InvalidDicomError as err:
        if size < 132 and not path.read_bytes().strip(b"\0"):  # cut inside the 128-byte preamble
            raise ValueError(f"{path}: truncated DICOM file ({size} bytes, ends inside the preamble).") from None
        if "DICM" in str(err):
            raise ValueError(f"{path}: not a DICOM file (no DICM preamble).") from None
        raise ValueError(f"{path}: not a DICOM file ({err}).") from None
    except PermissionError:
        raise
    except (EOFError, OSError, struct.error) as err:
        raise ValueError(f"{path}: truncated or corrupt DICOM file ({err}).") from None
    problem = _truncation(ds, size)
    if problem:
        raise ValueError(f"{path}: truncated DICOM file ({problem}).")
    return ds


def _truncation(ds: pydicom.Dataset, size: int) -> str:
    """How a file of ``size`` bytes ended before its dataset did ("" when it did not).

    pydicom reads a cut file without a word: a short last value, a partial element header dropped, or (inside
    encapsulated pixel data) no element at all. The last element, still raw after reading, tells where it ends.
    """
    if not len(ds):
        return "no data element could be read"
    last = ds.get_item(max(ds.keys()))
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if tell is None or length is None or length == _UNDEFINED_LENGTH:
        return ""
    end = tell + length
    if end > size:
        return f"element {last.tag} needs {end - size} more bytes"
    if 0 < size - end < 8:  # too short for an element header
        return f"{size - end} bytes of an element header at the end"
    return ""


def _not_a_slice(ds: pydicom.Dataset) -> str:
    """Why a DICOM dataset cannot be a slice of a series ("" when it can)."""
    if "DirectoryRecordSequence" in ds:
        return "is a DICOMDIR index, not an image"
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        return f"is a multi-frame DICOM with {frames} frames, not a slice"
    for tag in ("ImagePositionPatient", "ImageOrientationPatient"):
        if tag not in ds:
            return f"has no {tag}, so it is not a slice of a series"
    return ""


def is_dicom_series(folder: PathLike) -> bool:
    """Whether ``folder`` holds nothing but slices of one DICOM series.

    Every (non-hidden) file must be a single-frame DICOM image with ImagePositionPatient and ImageOrientationPatient,
    all with one SeriesInstanceUID, and there must be two or more (a folder with one DICOM file is that file, read as
    a single image). Only headers are read. Whether the slices form a regular stack is checked when the
    series is read (:func:`dicom_series_files`), so a broken series fails as one case with its own message.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return False
    files = _folder_files(folder)
    if len(files) < 2 or not all(is_dicom_file(f) for f in files):
        return False
    series = set()
    for name in files:
        try:
            ds = pydicom.dcmread(name, defer_size=HEADER_DEFER_SIZE)
        except Exception:  # any unreadable header: not a series; the file then fails as its own case
            return False
        if _not_a_slice(ds):
            return False
        series.add(str(ds.get("SeriesInstanceUID", "")))
    return len(series) == 1


def dicom_series_files(folder: PathLike) -> list[Path]:
    """The slice files of the DICOM series in ``folder``, sorted by position along the slice normal.

    Only headers are read. The folder must hold nothing but the slices of one series, forming one regular stack: one
    orientation, one size, pixel data in every file, distinct positions evenly spaced.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: anything else; the message starts with the folder or the offending file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing (no such directory).")
    files = _folder_files(folder)
    if not files:
        raise ValueError(f"{folder}: a folder that holds no image.")
    others = [f.name for f in files if not is_dicom_file(f)]
    if others:
        raise ValueError(f"{folder}: not one DICOM series, it also holds {', '.join(others[:3])}"
                         f"{' ...' if len(others) > 3 else ''}; a series folder holds only its slices.")
    slices = [(_dcmread(f, defer_size=HEADER_DEFER_SIZE), f) for f in files]
    _check_one_stack(slices, folder)
    orientation = np.asarray(slices[0][0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)) for ds, _ in slices])
    order = np.argsort(positions, kind="stable")
    if len(order) > 1:
        gaps = np.diff(positions[order])
        if gaps.min() < 1e-3:
            raise ValueError(f"{folder}: two slices share a position; is more than one acquisition in the folder?")
        if not np.allclose(gaps, gaps.mean(), rtol=0.01, atol=1e-3):
            raise ValueError(f"{folder}: slice spacing varies from {gaps.min():.4g} to {gaps.max():.4g} mm "
                             "(missing slices?).")
    return [slices[i][1] for i in order]


def _check_one_stack(slices: list[tuple[pydicom.Dataset, Path]], folder: Path) -> None:
    """Refuse folders that are not one series of parallel, equally sized slices (checked before decoding)."""
    series = {str(ds.get("SeriesInstanceUID", "")) for ds, _ in slices}
    if len(series) > 1:
        raise ValueError(f"{folder}: holds {len(series)} series; put one series per folder.")
    for ds, name in slices:
        problem = _not_a_slice(ds)
        if problem:
            raise ValueError(f"{name}: {problem}; a series folder holds only its slices.")
        if "PixelData" not in ds:
            raise ValueError(f"{name}: DICOM file has no pixel data.")
    orientation = np.asarray(slices[0][0].ImageOrientationPatient, dtype=float)
    if any(not np.allclose(ds.ImageOrientationPatient, orientation, atol=1e-4) for ds, _ in slices):
        raise ValueError(f"{folder}: slices have different ImageOrientationPatient; not one stack.")
    sizes = {(ds.get("Rows"), ds.get("Columns")) for ds, _ in slices}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: slices have different sizes {sorted(sizes)}.")


def _decode(ds: pydicom.Dataset, filename: PathLike) -> np.ndarray:
    """The stored values of a single-frame greyscale image, with the file named in every error."""
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        # an image storage class with no pixels: most often a file cut exactly between two elements
        hint = " (truncated file?)" if sop_class is not None and sop_class.name.endswith("Image Storage") else ""
        raise ValueError(f"{filename}: DICOM file has no pixel data{hint}.")
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
        raise ValueError(f"{filename}: cannot decode pixel data stored as {described}: {err}") from None


def _rescale(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality LUT: stored values to modality units (HU for CT)."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float64)
    # a lone slope or intercept still applies (the other takes its neutral value)
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    return arr.astype(np.float64) * slope + intercept


class DicomReader(PydicomReader):
    """MONAI image reader for single DICOM images: radiographs and single CT/MR slices.

    Builds on :class:`monai.data.PydicomReader` (metadata, affine, LPS to RAS, ``swap_ij``) and changes what
    the bundles rely on:

    - ``verify_suffix`` claims only DICOM files: a ``.dcm`` file or a file with the ``DICM`` preamble, so NIfTI,
      PNG and volume inputs go to their readers when several are registered. Folders are not claimed: a DICOM
      series is a volume, read by :class:`common.data.volume.VolumeReader`.
    - Pixel values are ``float32`` after the modality LUT (RescaleSlope/Intercept or Modality LUT Sequence).
    - With ``apply_voi`` the VOI LUT Sequence or WindowCenter/Width is applied next, then MONOCHROME1 is inverted
      (``min + max - x``) so that dense tissue is always bright. The metadata keeps the original
      ``PhotometricInterpretation``; the returned values are always in the MONOCHROME2 sense.
    - Spacing comes from PixelSpacing, else ImagerPixelSpacing. Radiographs without patient geometry get an
      axis-aligned affine holding that spacing (no LPS/RAS flip, which would turn them upside down).
    - Errors are ``ValueError`` (``FileNotFoundError`` for a missing path) starting with the offending path.

    Layout (as ``PydicomReader``): with ``swap_ij=True`` an image is ``(W, H)`` (``(x, y)``); :func:`read_dicom`
    returns it as ``(H, W)``. Multi-frame files (including DICOM SEG) and colour images are refused.

    Args:
        apply_voi: apply the VOI LUT/window. ``None`` (default) or ``True``: applied; ``False``: modality units.
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
        """``True`` only when every name is a DICOM file (folders are series, read as volumes)."""
        names = [Path(f"{name}") for name in ensure_tuple(filename)]
        return len(names) > 0 and all(not p.is_dir() and is_dicom_file(p) for p in names)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any):
        """Read one file (one dataset); several paths give a list of datasets, stacked as channels by ``get_data``."""
        kwargs_ = {**self.kwargs, **kwargs}
        images: list = []
        self.filenames = []
        self.has_series = False
        for name in ensure_tuple(data):
            path = Path(f"{name}")
            if path.is_dir():
                raise ValueError(f"{path}: a folder; DicomReader reads single DICOM files, series folders load "
                                 "through common.transforms.LoadMedicalImaged.")
            images.append(_dcmread(path, **kwargs_))
            self.filenames.append(str(path))
        return images[0] if len(images) == 1 else images

    def _get_array_data(self, img, filename):
        arr = _rescale(_decode(img, filename), img)
        if self.apply_voi is not False:
            arr = apply_voi_lut(arr, img)
        # projection images are flipped to "dense is bright"
        if img.get("PhotometricInterpretation") == "MONOCHROME1":
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


def read_dicom(path: PathLike, apply_voi: bool | None = None) -> tuple[np.ndarray, dict]:
    """Read one DICOM file (a radiograph or a single slice), for converters and scripts.

    Args:
        path: a DICOM file. Series folders are volumes: load them with
            :class:`common.transforms.LoadMedicalImaged` (or :class:`common.data.volume.VolumeReader`).
        apply_voi: as :class:`DicomReader`; ``None`` (default) applies the VOI LUT/window.

    Returns:
        ``(array, meta)``: a ``float32`` array ``(H, W)`` and its metadata with ``affine`` (matching the returned
        axes), ``spacing``, ``spatial_shape``, the tags in ``KEPT_TAGS`` and ``filename_or_obj``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a folder, not DICOM, no pixel data, undecodable transfer syntax, multi-frame or colour; the
            message starts with the path.
    """
    path = Path(path)
    reader = DicomReader(apply_voi=apply_voi, swap_ij=False)  # numpy's (rows, columns) order
    array, meta = reader.get_data(reader.read(path))
    meta["filename_or_obj"] = str(path)
    return array, meta
