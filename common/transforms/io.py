"""The one image reader of the collection, ``LoadMedicalImaged``: MONAI's readers (nibabel, PIL, NumPy, ITK through
``VolumeReader`` for MHA/NRRD/DICOM series, ``DicomReader``) behind checks that name the file and the problem."""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from monai.config import KeysCollection
from monai.data import ImageReader, NibabelReader, NumpyReader, PILReader
from monai.transforms import LoadImage, LoadImaged
from monai.utils import ensure_tuple
from nibabel.filebasedimages import ImageFileError

from common.data.dicom import DicomReader
from common.data.volume import VolumeReader

__all__ = ["LoadMedicalImaged", "READABLE_FORMATS"]

READABLE_FORMATS = ("NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), DICOM files and "
                    "DICOM series folders, PNG/JPEG/BMP, NumPy (.npy, .npz)")

# bytes read to tell a file's format by its content (a DICOM file shows "DICM" at 128)
_HEAD_SIZE = 512
# first bytes of the formats read, and of a few others worth naming when a file has another format's name
_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"BM": "BMP",
    b"\x1f\x8b": "gzip",
    b"NRRD": "NRRD",
    b"ObjectType": "MetaImage",
    b"\x93NUMPY": "NumPy",
    b"PK\x03\x04": "zip",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"%PDF": "PDF",
}
_DESCRIBED = {"PNG": "a PNG image", "JPEG": "a JPEG image", "BMP": "a BMP image", "gzip": "a gzip file",
              "NRRD": "a NRRD file", "MetaImage": "a MetaImage file", "NumPy": "a NumPy file", "zip": "a zip file",
              "TIFF": "a TIFF image", "PDF": "a PDF document", "DICOM": "a DICOM file", "NIfTI": "a NIfTI file",
              "text": "text"}
# PIL reads PNG, JPEG and BMP by their content whatever the name
_RASTER = {"PNG", "JPEG", "BMP"}
# name ending: (format named in messages, content formats its reader reads; None: content of no known format)
_EXPECTED = {
    ".png": ("PNG", _RASTER),
    ".jpg": ("JPEG", _RASTER),
    ".jpeg": ("JPEG", _RASTER),
    ".bmp": ("BMP", _RASTER),
    ".dcm": ("DICOM", {"DICOM"}),
    ".nii": ("NIfTI", {"NIfTI"}),
    ".nii.gz": ("gzip-compressed NIfTI", {"gzip"}),
    ".nrrd": ("NRRD", {"NRRD"}),
    ".nhdr": ("NRRD", {"NRRD"}),
    ".mha": ("MetaImage", {"MetaImage", "text", None}),  # no fixed first bytes: ITK names what is wrong
    ".mhd": ("MetaImage", {"MetaImage", "text", None}),
    ".npy": ("NumPy", {"NumPy"}),
    ".npz": ("NumPy (zip)", {"zip"}),
}
# what MONAI's readers (PIL, nibabel, NumPy) raise on a cut or damaged file; ours name the file themselves
# RuntimeError: MONAI's LoadImage wraps a reader's failure in one when it tried several readers
_READ_ERRORS = (OSError, EOFError, ValueError, SyntaxError, RuntimeError, struct.error, zlib.error, ImageFileError)


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not a character cut by the end of the head
            return False
        text = head[:err.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f" for c in text)


def _content_format(head: bytes) -> str | None:
    """The format the first bytes of a file show (a key of ``_DESCRIBED``), ``None`` when no known one."""
    if head[128:132] == b"DICM":
        return "DICOM"
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    if len(head) >= 4 and any(struct.unpack(f"{order}i", head[:4])[0] in (348, 540) for order in "<>"):
        return "NIfTI"  # sizeof_hdr of NIfTI-1 or NIfTI-2
    return "text" if _is_text(head) else None


def _what(found: str | None) -> str:
    """What a content sniff found, for messages."""
    return f"it is {_DESCRIBED[found]}" if found else "its first bytes match no format known here"


def _expected(path: Path) -> tuple[str, set] | None:
    name = path.name.lower()
    return next((expected for ending, expected in _EXPECTED.items() if name.endswith(ending)), None)


def _check_input(path: Path) -> str | None:
    """Refuse a path that cannot hold the image its name says, naming the problem; the format its content shows.

    Folders are left to :class:`~common.data.volume.VolumeReader`, whose series checks name what a folder lacks.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (no such file or directory).")
    if path.is_dir():
        return None
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: file is empty (0 bytes).")
    with path.open("rb") as file:
        head = file.read(_HEAD_SIZE)
    found = _content_format(head)
    expected = _expected(path)
    if found == "DICOM" or expected is None or found in expected[1]:
        if found == "gzip" and expected is not None and expected[0] == "gzip-compressed NIfTI":
            _check_gzip_nifti(path)
        return found
    if expected[0] == "DICOM":
        if found is None:  # DicomReader names it: no DICM preamble, or cut inside the preamble
            return found
        raise ValueError(f"{path}: content is not DICOM (no DICM preamble), {_what(found)}.")
    raise ValueError(f"{path}: content is not {expected[0]}, {_what(found)}.")


def _check_gzip_nifti(path: Path) -> None:
    try:
        with gzip.open(path) as file:
            inner = file.read(_HEAD_SIZE)
    except (OSError, EOFError, zlib.error):
        raise ValueError(f"{path}: truncated or corrupt NIfTI file (broken gzip stream).") from None
    found = _content_format(inner)
    if found != "NIfTI":
        held = _DESCRIBED[found] if found else "data of no format known here"
        raise ValueError(f"{path}: content is not NIfTI, the gzip file holds {held}.")


def _problem(kind: str | None) -> str | None:
    """What a read error of MONAI's readers means for a file of ``kind``; ``None``: let the error through."""
    if kind in _RASTER:
        return f"truncated or corrupt {kind} image"
    if kind in ("NIfTI", "gzip"):
        return "truncated or corrupt NIfTI file"
    if kind in ("NumPy", "zip"):
        return "truncated or corrupt NumPy file"
    return None


class _UnsupportedFormat(ImageReader):
    """Tried last: claims whatever no other reader did and refuses it, naming the file and the formats read."""

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        return True

    def read(self, data, **kwargs):
        for name in ensure_tuple(data):
            if not Path(f"{name}").exists():
                raise FileNotFoundError(f"{name}: missing (no such file or directory).")
        raise ValueError(f"{ensure_tuple(data)[0]}: unsupported image format; readable: {READABLE_FORMATS}.")

    def get_data(self, img):
        raise NotImplementedError


class _CheckedLoadImage(LoadImage):
    """``LoadImage`` whose failures are one line ``<path>: <problem>``: each path is checked before reading (missing,
    empty, content of another format) and what MONAI's readers raise on a damaged file is named as such."""

    def __call__(self, filename, reader: ImageReader | None = None):
        paths = [Path(f"{name}") for name in ensure_tuple(filename)]
        paths = [path.expanduser() for path in paths] if self.expanduser else paths
        problems = [(path, _problem(_check_input(path))) for path in paths]
        try:
            return super().__call__(filename, reader)
        except _READ_ERRORS as err:
            if isinstance(err, (ValueError, FileNotFoundError)) and str(err).startswith(tuple(map(str, paths))):
                raise  # already names the file and its problem
            problems = [(path, problem) for path, problem in problems if problem]
            if not problems:
                raise
            where = problems[0][0] if len(paths) == 1 else ", ".join(map(str, paths))
            # "from None": per-case reports show the innermost error, and this one names the file
            raise ValueError(f"{where}: {problems[0][1]}.") from None


class LoadMedicalImaged(LoadImaged):
    """``LoadImaged`` that picks one reader per input by its kind, the same in every bundle.

    - a DICOM file (``.dcm`` or ``DICM`` preamble): :class:`~common.data.dicom.DicomReader` (pydicom; MONOCHROME1
      inverted, rescale and VOI applied), the radiographs' path;
    - ``.mha``/``.mhd``/``.nrrd``/``.nhdr`` files and DICOM series folders: :class:`~common.data.volume.VolumeReader`
      (MONAI's ``ITKReader``, affine in RAS);
    - NIfTI, PNG/JPEG/BMP and NumPy files: MONAI's ``NibabelReader``, ``PILReader`` and ``NumpyReader``;
    - anything else: a ``ValueError`` naming the file and the formats read.

    MONAI's catch-all readers (``PydicomReader``, ``ITKReader``, which claim any file) are not used, so a wrong or
    unknown file never fails with another format's error. Volumes load with the same orientation and RAS affine
    whatever their format: after ``EnsureChannelFirstd`` and ``Orientationd(axcodes="RAS")`` one volume saved as
    NIfTI, NRRD, MetaImage or a DICOM series gives the same array and affine.

    An input that cannot be read fails with one line ``<path>: <problem>`` as the text of a ``ValueError``
    (``FileNotFoundError`` when missing), which per-case reports show: ``missing``, ``file is empty (0 bytes)``,
    ``content is not <format>, it is <what it is>`` (a file renamed; a DICOM file is read whatever its name),
    ``not a DICOM file (no DICM preamble)``, ``truncated DICOM file``, ``truncated or corrupt PNG image``,
    ``a folder that holds no image``... Each path is checked first (existence, size, first bytes), so a broken file
    never fails with a reader's internal error.

    Args:
        keys: keys of the paths to load.
        apply_voi: passed to ``DicomReader`` (``False``: single DICOM images stay in modality units).
        kwargs: further ``LoadImaged`` arguments (``image_only``, ``allow_missing_keys``...).
    """

    def __init__(self, keys: KeysCollection, apply_voi: bool | None = None, **kwargs) -> None:
        super().__init__(keys, reader=None, **kwargs)
        built = self._loader
        loader = _CheckedLoadImage(
            image_only=built.image_only, dtype=built.dtype, ensure_channel_first=built.ensure_channel_first,
            simple_keys=built.simple_keys, prune_meta_pattern=built.pattern, prune_meta_sep=built.sep,
            expanduser=built.expanduser,
        )
        # readers are tried from the last registered to the first
        loader.readers = [_UnsupportedFormat()] + [
            r for r in built.readers if isinstance(r, (NumpyReader, PILReader, NibabelReader))
        ]
        loader.register(VolumeReader())
        loader.register(DicomReader(apply_voi=apply_voi))
        self._loader = loader
