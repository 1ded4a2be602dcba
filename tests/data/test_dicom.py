from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from monai.transforms import LoadImage
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless

from common.data.dicom import DicomReader, read_dicom

FILES = Path(pydicom.data.__file__).parent / "test_files"
CT_SMALL = FILES / "CT_small.dcm"  # 128x128 CT slice, slope 1, intercept -1024, no window
MR_SMALL = FILES / "MR_small.dcm"  # 64x64 MR slice, signed 16 bit, window 600/1600, no rescale
CR_MONO1 = FILES / "dicomdirtests" / "77654033" / "CR1" / "6154"  # 16x16 CR, MONOCHROME1, ImagerPixelSpacing 0.1
CT_SERIES = FILES / "dicomdirtests" / "98892001" / "CT5N"  # 5 axial 16x16 slices: a volume, not for DicomReader

# (file under pydicom's test files, fragment of the message); the message must also start with the path
ILL_CASES = [
    ["rtplan.dcm", "DICOM file has no pixel data"],
    ["rtdose.dcm", "multi-frame DICOM with 15 frames"],
    ["SC_rgb_rle.dcm", "greyscale image is expected"],
    ["rtstruct.dcm", "not a DICOM file"],  # no preamble: refused unless force=True
    ["README.txt", "not a DICOM file"],
    ["dicomdirtests/98892001/CT5N", "a folder; DicomReader reads single DICOM files"],  # series load as volumes
]


def _edited(path: Path, source: Path = MR_SMALL, pixels: np.ndarray | None = None, **tags) -> Path:
    """Copy ``source`` to ``path`` with tags set (``None`` deletes) and optionally new int16 pixel values."""
    ds = pydicom.dcmread(source)
    for tag in ("WindowCenter", "WindowWidth"):  # start from an image with no VOI unless a test sets one
        if tag in ds:
            delattr(ds, tag)
    for tag, value in tags.items():
        if value is None:
            delattr(ds, tag)
        else:
            setattr(ds, tag, value)
    if pixels is not None:
        ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path)
    return path


def _raw(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array.astype(np.float64)


def test_ct_slice_in_hounsfield_units():
    image, meta = read_dicom(CT_SMALL)
    assert image.shape == (128, 128) and image.dtype == np.float32
    np.testing.assert_allclose(image, _raw(CT_SMALL) - 1024)
    np.testing.assert_allclose(meta["spacing"], [0.661468, 0.661468])
    assert meta["Modality"] == "CT" and meta["PatientID"] == "1CT1"
    assert meta["filename_or_obj"] == str(CT_SMALL)


def test_rescale_slope_and_intercept(tmp_path):
    path = _edited(tmp_path / "rescaled.dcm", RescaleSlope=2, RescaleIntercept=-1024)
    image, _ = read_dicom(path)
    np.testing.assert_allclose(image, 2 * _raw(MR_SMALL) - 1024)


def test_monochrome1_swaps_min_and_max(tmp_path):
    path = _edited(tmp_path / "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    raw = _raw(MR_SMALL)
    image, meta = read_dicom(path)
    np.testing.assert_allclose(image, raw.max() + raw.min() - raw)
    assert image.flat[raw.argmin()] == raw.max() and image.flat[raw.argmax()] == raw.min()
    assert meta["PhotometricInterpretation"] == "MONOCHROME1"  # the source's tag; values are MONOCHROME2-like


def test_window_clips_and_scales(tmp_path):
    ramp = np.arange(64 * 64).reshape(64, 64) % 256
    path = _edited(tmp_path / "window.dcm", pixels=ramp, WindowCenter=100, WindowWidth=101)
    image, _ = read_dicom(path)
    # PS3.3 C.11.2.1.2.1 (LINEAR): c = 99.5, w = 100; signed 16-bit output range [-32768, 32767]
    expected = np.clip(((ramp - 99.5) / 100 + 0.5) * 65535 - 32768, -32768, 32767)
    np.testing.assert_allclose(image, expected, rtol=1e-6)
    assert image.flat[0] == -32768 and image.flat[200] == 32767  # raw 0 and 200 lie outside [49.5, 149.5]
    np.testing.assert_allclose(image.flat[100], 0.505 * 65535 - 32768, rtol=1e-6)
    unwindowed, _ = read_dicom(path, apply_voi=False)
    np.testing.assert_array_equal(unwindowed, ramp)


def test_radiograph_monochrome1_with_imager_pixel_spacing():
    image, meta = read_dicom(CR_MONO1, apply_voi=False)
    rescaled = _raw(CR_MONO1) * 0.684 + 200
    np.testing.assert_allclose(image, rescaled.max() + rescaled.min() - rescaled, rtol=1e-6)
    np.testing.assert_allclose(meta["spacing"], [0.1, 0.1])
    windowed, _ = read_dicom(CR_MONO1)  # window 1600/2800 over [200, 2999]: values change but stay inverted
    assert np.corrcoef(windowed.ravel(), rescaled.ravel())[0, 1] < -0.99


def test_load_image_reads_dcm():
    image = LoadImage(reader=DicomReader(), ensure_channel_first=True)(CT_SMALL)
    assert tuple(image.shape) == (1, 128, 128)
    # MONAI layout: columns first, as the other readers
    np.testing.assert_allclose(image[0].numpy(), (_raw(CT_SMALL) - 1024).T)
    assert image.meta["Modality"] == "CT"


def test_load_image_radiograph_affine_is_axis_aligned():
    image = LoadImage(reader=DicomReader(), ensure_channel_first=True)(CR_MONO1)
    np.testing.assert_allclose(image.affine.numpy(), np.diag([0.1, 0.1, 1.0, 1.0]))


def test_verify_suffix_claims_only_dicom(tmp_path):
    reader = DicomReader()
    nifti = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), nifti)
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (tmp_path / "empty").mkdir()
    assert not reader.verify_suffix(nifti)
    assert not reader.verify_suffix(png)
    assert not reader.verify_suffix(tmp_path / "empty")
    assert not reader.verify_suffix(tmp_path)  # holds only the NIfTI and the PNG
    assert reader.verify_suffix(CT_SMALL)
    assert reader.verify_suffix(CR_MONO1)  # no suffix: found by its DICM preamble
    assert not reader.verify_suffix(CT_SERIES)  # a series folder is a volume (common.data.volume.VolumeReader)
    assert not reader.verify_suffix([CT_SMALL, nifti])


@pytest.mark.parametrize("name, message", ILL_CASES)
def test_ill_cases_name_the_file(name, message):
    path = FILES / name
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}.*{re.escape(message)}"):
        read_dicom(path)


def test_pixel_data_removed(tmp_path):
    path = _edited(tmp_path / "no_pixels.dcm", PixelData=None)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: DICOM file has no pixel data"):
        read_dicom(path)


@pytest.mark.skipif(get_decoder(JPEGLSLossless).is_available, reason="a JPEG-LS decoder is installed")
def test_undecodable_transfer_syntax_is_named():
    path = FILES / "MR_small_jpeg_ls_lossless.dcm"
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: cannot decode .*JPEG-LS Lossless"):
        read_dicom(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.dcm"))):
        read_dicom(tmp_path / "absent.dcm")


def test_apply_voi_is_validated():
    with pytest.raises(ValueError, match="apply_voi"):
        DicomReader(apply_voi="yes")
