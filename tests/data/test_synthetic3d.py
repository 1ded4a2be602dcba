from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common.data.synthetic3d import (
    HELDOUT_CLASSES,
    SHAPES,
    SYNTHETIC_CLASSES,
    TEXTURES,
    StructureClass,
    generate_synthetic_3d,
    generate_volume,
    smooth_random_field,
    write_nifti,
)

# shape, spacing, seed
TEST_CASES = [
    [(64, 64, 48), (1.0, 1.0, 2.5), 0],
    [(56, 72, 40), (0.8, 1.2, 3.0), 1],
    [(48, 48, 64), (1.2, 0.8, 1.5), 2],
]

ILL_VOLUME_CASES = [
    {"shape": (64, 64), "spacing": (1.0, 1.0, 2.0)},
    {"shape": (64, 64, 8), "spacing": (1.0, 1.0, 2.0)},
    {"shape": (64, 64, 48), "spacing": (1.0, 0.0, 2.0)},
    {"shape": (64, 64, 48), "spacing": (1.0, 1.0, 2.0), "presence": 1.5},
    {"shape": (64, 64, 48), "spacing": (1.0, 1.0, 2.0), "classes": []},
    {"shape": (64, 64, 48), "spacing": (1.0, 1.0, 2.0), "classes": [SYNTHETIC_CLASSES[0]] * 2},
]

ILL_CASES = [
    {"num_cases": 0},
    {"num_cases": 2.5},
    {"shape": (64, 64, 10)},
    {"spacing_range": ((0.8, 1.2), (0.8, 1.2))},
    {"spacing_range": ((0.8, 1.2), (1.2, 0.8), (1.5, 3.0))},
    {"spacing_range": ((0.0, 1.2), (0.8, 1.2), (1.5, 3.0))},
    {"seed": -1},
    {"split": (0.5, 0.2, 0.2)},
    {"split": (1.2, -0.1, -0.1)},
    {"shape_jitter": -1},
]

ILL_CLASS_CASES = [
    {"name": "Bad Name", "shape": "ellipsoid", "hu_mean": 0.0},
    {"name": "ok", "shape": "pyramid", "hu_mean": 0.0},
    {"name": "ok", "shape": "ellipsoid", "hu_mean": 0.0, "texture": "plaid"},
    {"name": "ok", "shape": "ellipsoid", "hu_mean": -2000.0},
    {"name": "ok", "shape": "ellipsoid", "hu_mean": 0.0, "hu_std": -1.0},
    {"name": "ok", "shape": "ellipsoid", "hu_mean": 0.0, "size_range_mm": (20.0, 10.0)},
]

SMALL = {"num_cases": 4, "shape": (48, 48, 32), "shape_jitter": 4}


def _volume(shape, spacing, seed, **kwargs):
    return generate_volume(np.random.default_rng(seed), shape, spacing, SYNTHETIC_CLASSES, **kwargs)


def test_class_catalogue():
    names = [c.name for c in SYNTHETIC_CLASSES]
    assert len(names) >= 10 and len(set(names)) == len(names)
    assert 2 <= len(HELDOUT_CLASSES) <= 3 and set(HELDOUT_CLASSES) < set(names)
    assert {c.shape for c in SYNTHETIC_CLASSES} == set(SHAPES)
    assert {c.texture for c in SYNTHETIC_CLASSES} == set(TEXTURES)
    assert all(-600.0 <= c.hu_mean <= 300.0 for c in SYNTHETIC_CLASSES)
    # training classes alone must still cover every texture, so held-out classes are new combinations
    assert {c.texture for c in SYNTHETIC_CLASSES if c.name not in HELDOUT_CLASSES} == set(TEXTURES)


@pytest.mark.parametrize("shape, spacing, seed", TEST_CASES)
def test_generate_volume(shape, spacing, seed):
    image, label = _volume(shape, spacing, seed)
    assert image.shape == label.shape == shape
    assert image.dtype == np.float32 and label.dtype == np.uint8
    present = set(np.unique(label).tolist()) - {0}
    assert present <= set(range(1, len(SYNTHETIC_CLASSES) + 1)) and len(present) >= 3
    # air outside the body, soft tissue in the middle
    assert image[0, 0].mean() < -900 and -100 < np.median(image[label == 0][image[label == 0] > -500]) < 100
    for value in present:
        mask = label == value
        spec = SYNTHETIC_CLASSES[value - 1]
        assert mask.sum() >= 20, spec.name
        # never overlapping nor touching: a one-voxel ring around each structure holds no other structure
        ring = ndimage.binary_dilation(mask) & ~mask
        assert not np.any(label[ring] > 0), spec.name


@pytest.mark.parametrize("shape, spacing, seed", TEST_CASES)
def test_class_intensity_consistent(shape, spacing, seed):
    image, label = _volume(shape, spacing, seed, presence=1.0)
    for value in set(np.unique(label).tolist()) - {0}:
        spec = SYNTHETIC_CLASSES[value - 1]
        mean = float(image[label == value].mean())
        # per-volume level is clipped to 2 std; textures, bias and noise are zero-mean
        assert abs(mean - spec.hu_mean) <= 2 * spec.hu_std + 25.0, (spec.name, mean)


def test_generate_volume_deterministic():
    first, second, other = _volume((48, 48, 32), (1.0, 1.0, 2.0), 7), _volume((48, 48, 32), (1.0, 1.0, 2.0), 7), \
        _volume((48, 48, 32), (1.0, 1.0, 2.0), 8)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[1], other[1])


def test_generate_volume_presence_and_subset():
    subset = SYNTHETIC_CLASSES[:4]
    counts = []
    for seed in range(6):
        _, label = generate_volume(np.random.default_rng(seed), (64, 64, 48), (1.0, 1.0, 2.5), subset, presence=0.0)
        counts.append(len(np.unique(label)) - 1)
        assert label.max() <= len(subset)
    assert counts == [3] * 6  # presence 0 still forces three classes
    _, label = generate_volume(np.random.default_rng(0), (64, 64, 48), (1.0, 1.0, 2.5), subset, presence=1.0)
    assert len(np.unique(label)) - 1 == 4


def test_generate_volume_draws_from_the_generator():
    # one generator gives a new volume each call, and the same sequence again from the same seed
    def draw(rng):
        return generate_volume(rng, (48, 48, 32), (1.0, 1.0, 2.5), SYNTHETIC_CLASSES)[1]

    rng, replay = np.random.default_rng(0), np.random.default_rng(0)
    labels = [draw(rng) for _ in range(3)]
    assert not any(np.array_equal(a, b) for i, a in enumerate(labels) for b in labels[i + 1:])
    for label in labels:
        np.testing.assert_array_equal(label, draw(replay))


@pytest.mark.parametrize("kwargs", ILL_VOLUME_CASES)
def test_generate_volume_ill(kwargs):
    kwargs = {"classes": SYNTHETIC_CLASSES, **kwargs}
    with pytest.raises(ValueError):
        generate_volume(np.random.default_rng(0), **kwargs)


@pytest.mark.parametrize("kwargs", ILL_CLASS_CASES)
def test_structure_class_ill(kwargs):
    with pytest.raises(ValueError):
        StructureClass(**kwargs)


def test_smooth_random_field():
    field = smooth_random_field(np.random.default_rng(0), (30, 20, 10), 4, std=3.0)
    assert field.shape == (30, 20, 10)
    np.testing.assert_allclose(field.std(), 3.0)
    # smooth: neighbouring voxels differ far less than the field varies
    assert np.abs(np.diff(field, axis=0)).mean() < 0.2 * field.std()
    with pytest.raises(ValueError):
        smooth_random_field(np.random.default_rng(0), (30, 20, 10), (4, 1, 4))


def test_write_nifti_spacing(tmp_path):
    path = write_nifti(np.zeros((4, 5, 6), dtype=np.int16), (0.5, 1.0, 2.5), tmp_path / "a.nii.gz")
    image = nib.load(path)
    np.testing.assert_allclose(image.header.get_zooms(), (0.5, 1.0, 2.5))
    assert image.get_data_dtype() == np.int16
    with pytest.raises(ValueError):
        write_nifti(np.zeros((4, 5, 6)), (1.0, 1.0), tmp_path / "b.nii.gz")


def test_generate_synthetic_3d(tmp_path):
    path = generate_synthetic_3d(tmp_path / "ds", seed=3, **SMALL)
    assert path == tmp_path / "ds" / "datalist.json"
    datalist = json.loads(path.read_text())
    assert {"name", "description", "seed", "modality", "labels", "heldout_labels", "training", "validation",
            "test"} <= set(datalist)
    assert datalist["name"] == "synthetic3d" and datalist["modality"] == "CT" and datalist["seed"] == 3
    assert datalist["labels"] == {str(i + 1): c.name for i, c in enumerate(SYNTHETIC_CLASSES)}
    assert datalist["heldout_labels"] == [n for n in datalist["labels"].values() if n in HELDOUT_CLASSES]
    assert len(datalist["heldout_labels"]) == len(HELDOUT_CLASSES)
    entries = datalist["training"] + datalist["validation"] + datalist["test"]
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [2, 1, 1]
    assert len({e["image"] for e in entries}) == SMALL["num_cases"]
    spacings, shapes = [], []
    for entry in entries:
        image, label = nib.load(path.parent / entry["image"]), nib.load(path.parent / entry["label"])
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, label.affine)
        assert image.shape == label.shape
        zooms = np.asarray(image.header.get_zooms())
        np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), zooms, rtol=1e-6)
        assert 0.8 <= zooms[0] <= 1.2 and 0.8 <= zooms[1] <= 1.2 and 1.5 <= zooms[2] <= 3.0
        assert zooms[2] > max(zooms[:2])  # anisotropic: thick slices
        assert all(abs(n - s) <= SMALL["shape_jitter"] for n, s in zip(image.shape, SMALL["shape"]))
        values = np.asarray(label.dataobj)
        assert len(np.unique(values)) - 1 >= 3 and values.max() <= len(SYNTHETIC_CLASSES)
        assert np.asarray(image.dataobj).min() >= -1024
        spacings.append(tuple(zooms))
        shapes.append(image.shape)
    assert len(set(spacings)) == len(entries) and len(set(shapes)) > 1


def test_generate_synthetic_3d_deterministic(tmp_path):
    first = generate_synthetic_3d(tmp_path / "a", seed=5, **SMALL)
    second = generate_synthetic_3d(tmp_path / "b", seed=5, **SMALL)
    other = generate_synthetic_3d(tmp_path / "c", seed=6, **SMALL)
    assert first.read_bytes() == second.read_bytes()
    for entry in json.loads(first.read_text())["training"]:
        for key in ("image", "label"):
            assert (first.parent / entry[key]).read_bytes() == (second.parent / entry[key]).read_bytes()
            assert (first.parent / entry[key]).read_bytes() != (other.parent / entry[key]).read_bytes()


def test_generate_synthetic_3d_custom_classes(tmp_path):
    classes = [c for c in SYNTHETIC_CLASSES if c.name not in HELDOUT_CLASSES][:5]
    datalist = json.loads(generate_synthetic_3d(tmp_path, classes=classes, **SMALL).read_text())
    assert datalist["labels"] == {str(i + 1): c.name for i, c in enumerate(classes)}
    assert datalist["heldout_labels"] == []
    label = np.asarray(nib.load(tmp_path / datalist["training"][0]["label"]).dataobj)
    assert label.max() <= len(classes)


def test_generate_synthetic_3d_exists(tmp_path):
    generate_synthetic_3d(tmp_path, num_cases=1, shape=(32, 32, 16), shape_jitter=0)
    with pytest.raises(FileExistsError, match="datalist.json"):
        generate_synthetic_3d(tmp_path, num_cases=1, shape=(32, 32, 16), shape_jitter=0)
    path = generate_synthetic_3d(tmp_path, num_cases=2, shape=(32, 32, 16), shape_jitter=0, overwrite=True)
    assert len(json.loads(path.read_text())["training"]) == 2


@pytest.mark.parametrize("kwargs", ILL_CASES)
def test_generate_synthetic_3d_ill(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_synthetic_3d(tmp_path, **kwargs)
    assert not (tmp_path / "datalist.json").exists()
