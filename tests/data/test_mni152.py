from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from common.data.mni152 import MNI152_CLASSES, build_mni152_task, mni152_label_map

# gm, wm, threshold, expected labels
LABEL_CASES = [
    [[0.9, 0.3, 0.5, 0.1, 0.45, 0.0], [0.1, 0.7, 0.5, 0.2, 0.4, 0.0], 0.5, [1, 2, 1, 0, 0, 0]],
    [[0.9, 0.3, 0.5, 0.1, 0.45, 0.0], [0.1, 0.7, 0.5, 0.2, 0.4, 0.0], 0.4, [1, 2, 1, 0, 1, 0]],
    [[[0.6, 0.2], [0.3, 0.3]], [[0.3, 0.8], [0.3, 0.6]], 0.8, [[0, 2], [0, 0]]],
]

ILL_LABEL_CASES = [
    {"gm": np.zeros((2, 2)), "wm": np.zeros((2, 3))},
    {"gm": np.zeros(3), "wm": np.zeros(3), "threshold": 0.0},
    {"gm": np.zeros(3), "wm": np.zeros(3), "threshold": 1.5},
]

ILL_CASES = [
    {"num_queries": 0},
    {"resolution": 0},
    {"resolution": 1.5},
    {"seed": -3},
    {"deformation_scale": -0.1},
    {"bias_strength": float("nan")},
    {"noise_std": -1.0},
    {"threshold": 0.0},
]


def _load(root, relative):
    return np.asarray(nib.load(root / relative).dataobj)


def _dice(a, b, value):
    a, b = a == value, b == value
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_mni152_task(tmp_path_factory.mktemp("mni") / "task", num_queries=2, seed=0)


@pytest.mark.parametrize("gm, wm, threshold, expected", LABEL_CASES)
def test_mni152_label_map(gm, wm, threshold, expected):
    labels = mni152_label_map(np.array(gm), np.array(wm), threshold)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("kwargs", ILL_LABEL_CASES)
def test_mni152_label_map_ill(kwargs):
    with pytest.raises(ValueError):
        mni152_label_map(**kwargs)


def test_build_mni152_task_files(task):
    root = task["datalist"].parent
    assert task["references"] == root / "references.json"
    references = json.loads(task["references"].read_text())
    datalist = json.loads(task["datalist"].read_text())
    assert references["classes"] == {"gray_matter": 1, "white_matter": 2} == MNI152_CLASSES
    assert references["references"] == [
        {"image": "reference/mni152_t1.nii.gz", "label": "reference/mni152_labels.nii.gz"}
    ]
    assert "ICBM152 2009" in references["source"] and "nilearn" in references["source"]
    assert datalist["name"] == "mni152" and datalist["modality"] == "MR"
    assert datalist["labels"] == {"1": "gray_matter", "2": "white_matter"}
    assert [e["image"] for e in datalist["test"]] == ["queries/mni152_q000.nii.gz", "queries/mni152_q001.nii.gz"]

    reference = nib.load(root / "reference/mni152_t1.nii.gz")
    assert reference.shape == (99, 117, 95)
    np.testing.assert_allclose(np.diag(reference.affine)[:3], (2.0, 2.0, 2.0))
    for entry in datalist["test"]:
        image, label = nib.load(root / entry["image"]), nib.load(root / entry["label"])
        assert image.shape == label.shape == reference.shape
        np.testing.assert_allclose(image.affine, reference.affine)
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        assert float(np.asarray(image.dataobj).min()) >= 0.0


def test_build_mni152_task_labels(task):
    root = task["datalist"].parent
    reference = _load(root, "reference/mni152_labels.nii.gz")
    assert set(np.unique(reference).tolist()) == {0, 1, 2}
    ref_counts = np.array([(reference == v).sum() for v in (1, 2)])
    # gray matter outweighs white matter in the adult brain
    assert 1.2 < ref_counts[0] / ref_counts[1] < 2.5
    for entry in json.loads(task["datalist"].read_text())["test"]:
        query = _load(root, entry["label"])
        assert set(np.unique(query).tolist()) == {0, 1, 2}
        counts = np.array([(query == v).sum() for v in (1, 2)])
        # scale in [0.9, 1.1] per axis changes volumes by at most about 30 %
        assert np.all(np.abs(counts / ref_counts - 1.0) < 0.3), counts / ref_counts
        # the deformation moves both tissues together, so their proportions barely change
        np.testing.assert_allclose(counts[0] / counts.sum(), ref_counts[0] / ref_counts.sum(), rtol=0.05)
        # genuinely deformed, yet the same anatomy
        assert 0.3 < _dice(reference, query, 2) < 0.98


def test_build_mni152_task_identity(tmp_path):
    paths = build_mni152_task(tmp_path, num_queries=1, deformation_scale=0.0, bias_strength=0.0, noise_std=0.0)
    datalist = json.loads(paths["datalist"].read_text())
    reference_labels = _load(tmp_path, "reference/mni152_labels.nii.gz")
    query_labels = _load(tmp_path, datalist["test"][0]["label"])
    assert _dice(reference_labels, query_labels, 1) == 1.0 and _dice(reference_labels, query_labels, 2) == 1.0
    np.testing.assert_array_equal(_load(tmp_path, datalist["test"][0]["image"]),
                                  _load(tmp_path, "reference/mni152_t1.nii.gz"))


def test_build_mni152_task_deterministic(tmp_path, task):
    same = build_mni152_task(tmp_path / "same", num_queries=1, seed=0)
    other = build_mni152_task(tmp_path / "other", num_queries=1, seed=1)
    for name in ("mni152_q000.nii.gz", "mni152_q000_labels.nii.gz"):
        first = (task["datalist"].parent / "queries" / name).read_bytes()
        assert first == (same["datalist"].parent / "queries" / name).read_bytes()
        assert first != (other["datalist"].parent / "queries" / name).read_bytes()


def test_build_mni152_task_exists(task):
    with pytest.raises(FileExistsError, match="references.json"):
        build_mni152_task(task["datalist"].parent, num_queries=1)


def test_build_mni152_task_overwrite(tmp_path):
    (tmp_path / "datalist.json").write_text("{}")
    with pytest.raises(FileExistsError, match="datalist.json"):
        build_mni152_task(tmp_path, num_queries=1)
    paths = build_mni152_task(tmp_path, num_queries=1, overwrite=True, bias_strength=0.0, noise_std=0.0)
    assert len(json.loads(paths["datalist"].read_text())["test"]) == 1


@pytest.mark.parametrize("kwargs", ILL_CASES)
def test_build_mni152_task_ill(tmp_path, kwargs):
    with pytest.raises(ValueError):
        build_mni152_task(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
