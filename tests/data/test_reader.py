"""The one loading path (``LoadMedicalImaged``) for volumes: NIfTI, NRRD, MetaImage and DICOM series agree; folder
rules of ``list_images``; every bad input named with its problem."""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import itk
import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirstd, Orientation, Orientationd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from common.data import ErrorTolerantDataset, list_images
from common.data.dicom import dicom_series_files, is_dicom_series
from common.data.volume import VolumeReader
from common.transforms import LoadMedicalImaged, ValidateImaged

FILES = Path(pydicom.data.__file__).parent / "test_files"
CT_SMALL = FILES / "CT_small.dcm"  # 128x128 CT slice, slope 1, intercept -1024
CT_SERIES = FILES / "dicomdirtests" / "98892001" / "CT5N"  # 5 axial 16x16 slices, 2.5 mm apart, z descending

# one anisotropic volume, voxel axes (x, y, z) = (6, 5, 4) running right to left, mostly up and mostly backwards
# (the last two turned off the axes by cosines 0.6 and 0.8, exact in DICOM's decimal strings); a left-handed grid whose
# slice normal points against the slice order, so RAS orientation swaps two axes and flips two; origin off zero
DIRECTION = np.array([[-1.0, 0.0, 0.0], [0.0, 0.6, -0.8], [0.0, 0.8, 0.6]])
SPACING = np.array([0.8, 1.25, 2.5])
ORIGIN = np.array([10.5, -20.0, 30.25])
AFFINE = np.eye(4)
AFFINE[:3, :3], AFFINE[:3, 3] = DIRECTION @ np.diag(SPACING), ORIGIN
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (ITK and DICOM patient coordinates)
VOLUME = (np.arange(6 * 5 * 4).reshape(6, 5, 4) * 37 % 251 - 1000).astype(np.float32)  # HU-like, no symmetry


def _write_nifti(path: Path) -> Path:
    nib.save(nib.Nifti1Image(VOLUME, AFFINE), path)
    return path


def _write_nrrd(path: Path) -> Path:
    # written by pynrrd in RAS space, so ITK has to convert it to LPS
    header = {"space": "right-anterior-superior", "space directions": AFFINE[:3, :3].T.tolist(),
              "space origin": ORIGIN.tolist()}
    nrrd.write(str(path), VOLUME, header)
    return path


def _itk_image(array: np.ndarray, affine: np.ndarray):
    """An ITK image (LPS) of an ``(x, y[, z])`` array with a RAS ``affine``."""
    dims = array.ndim
    image = itk.image_from_array(np.ascontiguousarray(array.T))  # ITK takes numpy's (z, y, x)
    lps = (LPS @ affine) if dims == 3 else (LPS[:3, :3] @ affine)
    spacing = np.linalg.norm(lps[:dims, :dims], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:dims, dims].tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(lps[:dims, :dims] / spacing)))
    return image


def _write_itk(path: Path) -> Path:
    itk.imwrite(_itk_image(VOLUME, AFFINE), str(path))  # ".mhd" also writes its ".raw"
    return path


def _slice(ds_values: dict, pixels: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds_values["SOPInstanceUID"]
    ds.SOPClassUID, ds.Modality, ds.PatientID, ds.StudyInstanceUID = CTImageStorage, "CT", "synthetic", "1.2.826.0.1.1"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    for tag, value in ds_values.items():
        setattr(ds, tag, value)
    ds.PixelData = (pixels + 1024).astype(np.uint16).tobytes()
    return ds


def _write_series(folder: Path, series_uid: str = "1.2.826.0.1.1.2") -> Path:
    """One file per slice along z, named and numbered out of order so that only the positions give the order."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ AFFINE
    orientation = [*(lps[:3, 0] / SPACING[0]), *(lps[:3, 1] / SPACING[1])]
    for k in range(VOLUME.shape[2]):
        values = {
            "SOPInstanceUID": f"{series_uid}.{k + 1}", "SeriesInstanceUID": series_uid,
            "InstanceNumber": (3 * k) % 4 + 1, "PixelSpacing": [SPACING[1], SPACING[0]],  # rows apart, columns apart
            "SliceThickness": SPACING[2], "ImageOrientationPatient": orientation,
            "ImagePositionPatient": (lps @ [0, 0, k, 1])[:3].tolist(),
        }
        _slice(values, VOLUME[:, :, k].T).save_as(folder / f"slice{(5 * k) % 4}.dcm", enforce_file_format=True)
    return folder


def _write_png(path: Path) -> Path:
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)
    return path


# (name under tmp_path, writer): the same volume in every format the loading path reads
FORMAT_CASES = [
    ["volume.nii.gz", _write_nifti],
    ["volume.nrrd", _write_nrrd],
    ["volume.mha", _write_itk],
    ["volume.mhd", _write_itk],
    ["series", _write_series],
]


def _load(path: Path, *transforms) -> MetaTensor:
    data = {"image": str(path)}
    for transform in (LoadMedicalImaged(keys="image"), EnsureChannelFirstd(keys="image"), *transforms):
        data = transform(data)
    return data["image"]


@pytest.mark.parametrize("name, write", FORMAT_CASES)
def test_one_volume_loads_alike_in_every_format(tmp_path, name, write):
    expected = Orientation(axcodes="RAS")(MetaTensor(VOLUME[None], affine=AFFINE))
    image = _load(write(tmp_path / name), Orientationd(keys="image", axcodes="RAS"))
    assert tuple(image.shape) == tuple(expected.shape) == (1, 6, 4, 5)
    np.testing.assert_allclose(image.numpy(), expected.numpy())
    np.testing.assert_allclose(image.affine.numpy(), expected.affine.numpy(), atol=1e-5)
    assert nib.aff2axcodes(image.affine.numpy()) == nib.aff2axcodes(expected.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(np.linalg.norm(image.affine.numpy()[:3, :3], axis=0), [0.8, 2.5, 1.25], atol=1e-5)


def test_series_sorted_by_position_in_hounsfield_units(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    sources = sorted(CT_SERIES.iterdir())
    # scramble InstanceNumber and file names so neither gives the order
    for k, (source, number) in enumerate(zip(sources, [3, 1, 5, 2, 4])):
        ds = pydicom.dcmread(source)
        ds.InstanceNumber = number
        ds.save_as(folder / f"slice{(7 * k) % 5}.dcm")
    image = _load(folder)
    assert tuple(image.shape) == (1, 16, 16, 5) and image.dtype == torch.float32 and image.meta["Modality"] == "CT"
    np.testing.assert_allclose(image.meta["spacing"], [0.488281, 0.488281, 2.5], rtol=1e-6)
    by_z = sorted(sources, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for k, source in enumerate(by_z):
        ds = pydicom.dcmread(source)
        np.testing.assert_allclose(image[0, ..., k].numpy(), ds.pixel_array.T.astype(np.float32) - 1024)
        z = (image.affine.numpy() @ np.array([0, 0, k, 1]))[2]  # S in RAS is +z in LPS
        np.testing.assert_allclose(z, float(ds.ImagePositionPatient[2]), atol=1e-4)


# (folder under pydicom's test files, fragment of the message); the message starts with the folder
SERIES_ILL_CASES = [
    ["dicomdirtests/98892003/MR700", "different ImageOrientationPatient"],  # radial slices
    ["dicomdirtests/98892003/MR2", "holds 3 series"],
    ["dicomdirtests/77654033/CT2", "slice spacing varies"],  # a scout 200 mm away from three thin slices
]


@pytest.mark.parametrize("name, message", SERIES_ILL_CASES)
def test_broken_series_name_the_folder(name, message):
    folder = FILES / name
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder))}.*{re.escape(message)}"):
        _load(folder)


def _bad_mha(path: Path) -> None:
    path.write_bytes(b"not an image")


def _mhd_without_data(path: Path) -> None:
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_FLOAT\n"
                    "ElementDataFile = absent.raw\n")


def _mixed_folder(path: Path) -> None:
    _write_series(path)
    _write_png(path / "notes.png")


# (name under tmp_path, writer, fragment of the message): never another format's error (InvalidDicomError...)
UNREADABLE_CASES = [
    ["bad.mha", _bad_mha, "cannot read as a MetaImage file"],
    ["empty.mhd", _mhd_without_data, "cannot read as a MetaImage file"],
    ["bad.nrrd", _bad_mha, "content is not NRRD, it is text"],
    ["notes.txt", _bad_mha, "unsupported image format; readable: NIfTI"],
    ["empty_folder", Path.mkdir, "a folder that holds no image"],
    ["mixed_folder", _mixed_folder, "not one DICOM series, it also holds notes.png"],
]


@pytest.mark.parametrize("name, write, message", UNREADABLE_CASES)
def test_unreadable_inputs_name_the_file_and_problem(tmp_path, name, write, message):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {re.escape(message)}"):
        _load(path)


def test_missing_volume_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(tmp_path / 'absent.mha'))}: missing"):
        _load(tmp_path / "absent.mha")


def _png_bytes(size: int = 64, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def _nifti_gz_bytes() -> bytes:
    volume = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    return gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes())


# (name under tmp_path, content, exception, problem): the message is "<path>: <problem>", one line
BROKEN_CASES = [
    ["empty.png", b"", ValueError, "file is empty (0 bytes)"],
    ["cut.png", _png_bytes()[:2000], ValueError, "truncated or corrupt PNG image"],  # inside the pixel data
    ["cut_header.png", _png_bytes()[:30], ValueError, "truncated or corrupt PNG image"],  # inside IHDR
    ["cut.jpg", _png_bytes(fmt="JPEG")[:600], ValueError, "truncated or corrupt JPEG image"],
    ["text.png", b"not an image\n", ValueError, "content is not PNG, it is text"],
    ["empty.dcm", b"", ValueError, "file is empty (0 bytes)"],
    ["binary.dcm", bytes(range(256)) * 2, ValueError, "not a DICOM file (no DICM preamble)"],
    ["cut.dcm", CT_SMALL.read_bytes()[:-1000], ValueError, "truncated DICOM file (element (7FE0,0010) needs"],
    ["cut_header.dcm", CT_SMALL.read_bytes()[:1001], ValueError, "truncated DICOM file"],
    ["cut_preamble.dcm", bytes(100), ValueError, "truncated DICOM file"],
    ["png.dcm", _png_bytes(), ValueError, "content is not DICOM (no DICM preamble), it is a PNG image"],
    ["text.nii.gz", b"not an image\n", ValueError, "content is not gzip-compressed NIfTI, it is text"],
    ["text_in_gzip.nii.gz", gzip.compress(b"not an image\n"), ValueError,
     "content is not NIfTI, the gzip file holds text"],
    ["cut.nii.gz", _nifti_gz_bytes()[:10000], ValueError, "truncated or corrupt NIfTI file"],
    ["empty.nii.gz", b"", ValueError, "file is empty (0 bytes)"],
    ["png.mha", _png_bytes(), ValueError, "content is not MetaImage, it is a PNG image"],
    ["empty.mha", b"", ValueError, "file is empty (0 bytes)"],
    ["ünïcode façade.dcm", b"", ValueError, "file is empty (0 bytes)"],
    ["missing.png", None, FileNotFoundError, "missing"],
    ["missing.dcm", None, FileNotFoundError, "missing"],
    ["empty_folder", "folder", ValueError, "a folder that holds no image"],
]


@pytest.mark.parametrize("name, content, error, problem", BROKEN_CASES, ids=[case[0] for case in BROKEN_CASES])
def test_broken_file_names_its_problem(tmp_path, name, content, error, problem):
    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=f"^{re.escape(str(path))}: {re.escape(problem)}") as caught:
        _load(path)
    assert "\n" not in str(caught.value)
    # what per-case reports show
    items = list(ErrorTolerantDataset([{"image": str(path)}], transform=LoadMedicalImaged(keys="image")))
    assert items[0]["error"] == f"{path}: {error.__name__}: {caught.value}"


def _copy_ct(path: Path) -> None:
    path.write_bytes(CT_SMALL.read_bytes())


def _write_jpeg_named_png(path: Path) -> None:
    path.write_bytes(_png_bytes(8, fmt="JPEG"))  # PIL reads by content


# (name under tmp_path, writer, spatial shape after EnsureChannelFirstd)
GOOD_CASES = [
    ["cxr.png", _write_png, (8, 8)],
    ["ünïcode façade.png", _write_png, (8, 8)],
    ["jpeg.png", _write_jpeg_named_png, (8, 8)],
    ["ct.dcm", _copy_ct, (128, 128)],
    ["ünïcode façade.dcm", _copy_ct, (128, 128)],
    ["volume.nii.gz", _write_nifti, (6, 5, 4)],
    ["volume.nii", _write_nifti, (6, 5, 4)],
    ["volume.mha", _write_itk, (6, 5, 4)],
    ["ünïcode façade.mha", _write_itk, (6, 5, 4)],
]


@pytest.mark.parametrize("name, write, shape", GOOD_CASES)
def test_good_files_still_load(tmp_path, name, write, shape):
    path = tmp_path / name
    write(path)
    image = _load(path)
    assert tuple(image.shape) == (1, *shape) and image.meta["filename_or_obj"] == str(path)


def test_2d_mha_is_refused_by_a_3d_bundle(tmp_path):
    path = tmp_path / "slice.mha"
    itk.imwrite(_itk_image(VOLUME[:, :, 0], np.diag([0.8, 1.25, 1.0])), str(path))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: expected a 3D image, got spatial shape \\[6, 5\\]"):
        _load(path, ValidateImaged(keys="image", spatial_dims=3))


def _series_folder(root: Path) -> None:
    _write_series(root)


def _two_series(root: Path) -> None:
    _write_series(root / "ct")
    _write_series(root / "ct2", series_uid="1.2.826.0.1.1.3")
    for path in (root / "ct2").iterdir():
        path.rename(root / "ct" / f"b_{path.name}")
    (root / "ct2").rmdir()


def _study(root: Path) -> None:
    _write_series(root / "a")
    _write_series(root / "b", series_uid="1.2.826.0.1.1.3")
    _write_nifti(root / "volume.nii.gz")
    (root / "empty").mkdir()


def _pngs(root: Path) -> None:
    root.mkdir()
    for k in range(3):
        _write_png(root / f"cxr{k}.png")
    (root / "README.txt").write_text("not an image")


def _one_dcm(root: Path) -> None:
    root.mkdir()
    (root / "only.dcm").write_bytes(CT_SMALL.read_bytes())


def _stray_dcm(root: Path) -> None:
    _pngs(root)
    _write_nifti(root / "volume.nii.gz")
    (root / "stray.dcm").write_bytes(CT_SMALL.read_bytes())


# (folder writer, cases list_images gives, relative to the folder; "." is the folder itself)
FOLDER_CASES = [
    [_series_folder, ["."]],
    [_mixed_folder, ["notes.png", "slice0.dcm", "slice1.dcm", "slice2.dcm", "slice3.dcm"]],
    [_two_series, [f"ct/{prefix}slice{k}.dcm" for prefix in ("b_", "") for k in range(4)]],
    [_study, ["a", "b", "volume.nii.gz"]],
    [_pngs, ["cxr0.png", "cxr1.png", "cxr2.png"]],
    [_one_dcm, ["only.dcm"]],
    [_stray_dcm, ["cxr0.png", "cxr1.png", "cxr2.png", "stray.dcm", "volume.nii.gz"]],
]


@pytest.mark.parametrize("write, expected", FOLDER_CASES)
def test_folder_is_one_series_or_its_files(tmp_path, write, expected):
    root = tmp_path / "input"
    write(root)
    spec = root / "ct" if write is _two_series else root
    cases = [item["image"] for item in list_images(str(spec))]
    base = root.resolve()
    assert cases == [str((base / name).resolve()) for name in expected]
    # the same rule for folders matched by a pattern
    assert [item["image"] for item in list_images(str(spec) + "*")] == cases


def test_series_files_sorted_along_the_normal(tmp_path):
    folder = _write_series(tmp_path / "series")
    assert is_dicom_series(folder) and not is_dicom_series(folder / "slice0.dcm")
    files = dicom_series_files(folder)
    orientation = np.asarray(pydicom.dcmread(files[0]).ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [float(np.dot(normal, pydicom.dcmread(f).ImagePositionPatient)) for f in files]
    assert positions == sorted(positions) and len(files) == 4
    assert VolumeReader().verify_suffix(folder) and not VolumeReader().verify_suffix(tmp_path / "x.nii.gz")


def test_bad_file_of_a_folder_is_its_own_case(tmp_path):
    root = tmp_path / "queries"
    root.mkdir()
    _write_nifti(root / "good.nii.gz")
    _bad_mha(root / "bad.mha")
    items = list(ErrorTolerantDataset(list_images(str(root)), transform=LoadMedicalImaged(keys="image")))
    assert len(items) == 2 and tuple(items[1]["image"].shape) == (6, 5, 4)
    assert items[0]["error"].startswith(f"{(root / 'bad.mha').resolve()}: ValueError: ")
    assert "cannot read as a MetaImage file" in items[0]["error"] and "InvalidDicomError" not in items[0]["error"]
