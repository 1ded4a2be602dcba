from __future__ import annotations

from monai.config import KeysCollection
from monai.transforms import LoadImaged

from common.data.dicom import DicomReader

__all__ = ["LoadMedicalImaged"]


class LoadMedicalImaged(LoadImaged):
    """``LoadImaged`` that reads DICOM with the collection's one DICOM reader and everything else as MONAI does.

    MONAI picks a reader per file by its suffix. Registering :class:`~common.data.dicom.DicomReader` (instead of
    passing it as ``reader``, which makes MONAI try it first on every file) keeps that choice: DICOM files and
    series folders go to it (MONOCHROME1 inverted, rescale and VOI applied), NIfTI, NRRD and PNG/JPEG to MONAI's
    readers.

    Args:
        keys: keys of the paths to load.
        apply_voi: passed to ``DicomReader`` (None: windowing for 2D images only).
        kwargs: further ``LoadImaged`` arguments (``image_only``, ``allow_missing_keys``...).
    """

    def __init__(self, keys: KeysCollection, apply_voi: bool | None = None, **kwargs) -> None:
        super().__init__(keys, reader=None, **kwargs)
        self._loader.register(DicomReader(apply_voi=apply_voi))
