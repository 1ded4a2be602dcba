from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest

from common.data.synthetic_ct_reports import (
    CT_REGIONS,
    LESION_TYPES,
    generate_ct_report_case,
    generate_ct_report_dataset,
)

SHAPE = (16, 64, 64)
NOUNS = {k.name: k.noun for k in LESION_TYPES}

ILL_CASES = [
    {"num_cases": 0},
    {"num_cases": 2.5},
    {"shape": (8, 64, 64)},
    {"shape": (16, 64)},
    {"seed": -1},
    {"split": (0.5, 0.5, 0.5)},
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ct_reports")
    path = generate_ct_report_dataset(out, num_cases=6, shape=SHAPE, seed=3, split=(0.6, 0.2, 0.2))
    return path, json.loads(path.read_text())


def _cases(datalist: dict) -> list[dict]:
    return datalist["training"] + datalist["validation"] + datalist["test"]


def test_layout_and_split(dataset):
    path, datalist = dataset
    assert datalist["regions"] == {str(i + 1): name for i, name in enumerate(CT_REGIONS)}
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [4, 1, 1]  # 6 - round(1.2) - round(1.2)
    for case in _cases(datalist):
        image = nib.load(path.parent / case["image"])
        mask = nib.load(path.parent / case["mask"])
        assert image.shape == mask.shape == (SHAPE[2], SHAPE[1], SHAPE[0])  # (X, Y, Z) on disk
        assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.header.get_zooms(), (5.0, 5.0, 10.0))
        assert set(np.unique(np.asarray(mask.dataobj))) <= set(range(len(CT_REGIONS) + 1))


def test_reports_mention_every_lesion(dataset):
    path, datalist = dataset
    for case in _cases(datalist):
        report, lesions = case["report"], case["lesions"]
        assert 1 <= len(lesions) <= 3
        assert report["regions_mentioned"] == sorted({les["region_id"] for les in lesions})
        by_region = {f["region_id"]: f["text"] for f in report["findings"]}
        assert sorted(by_region) == report["regions_mentioned"]
        for les in lesions:
            phrase = f"{les['size_mm']} mm {NOUNS[les['type']]}"
            region = les["region"].replace("_", " ")
            assert phrase in by_region[les["region_id"]] and region in by_region[les["region_id"]]
            assert phrase.split(" mm ")[0] in report["impression"] and NOUNS[les["type"]] in report["impression"]
            assert CT_REGIONS[les["region_id"] - 1] == les["region"]
            steps = [s["step"] for s in report["cot"] if s["mask_region"] == les["region_id"]]
            assert any(phrase in s and region in s for s in steps)
        assert all(isinstance(s["mask_region"], int) and 1 <= s["mask_region"] <= len(CT_REGIONS)
                   for s in report["cot"])
        assert {s["mask_region"] for s in report["cot"]} == set(report["regions_mentioned"])
        assert all(re.match(r"^[A-Z].*\.$", s) for s in [report["impression"], *by_region.values()])


def test_lesions_sit_in_their_region(dataset):
    path, datalist = dataset
    for case in _cases(datalist):
        # network order (D, H, W) is the file's (X, Y, Z) reversed
        image = np.asarray(nib.load(path.parent / case["image"]).dataobj).transpose(2, 1, 0)
        mask = np.asarray(nib.load(path.parent / case["mask"]).dataobj).transpose(2, 1, 0)
        for les in case["lesions"]:
            centre = tuple(les["center"])
            assert mask[centre] == les["region_id"]
            assert abs(float(image[centre]) - les["hu"]) < 100.0  # the lesion's level plus noise


def test_cases_differ(dataset):
    _, datalist = dataset
    combos = {tuple((les["type"], les["size_mm"], les["region"]) for les in c["lesions"]) for c in _cases(datalist)}
    assert len(combos) == 6


def test_deterministic(tmp_path, dataset):
    path, _ = dataset
    again = generate_ct_report_dataset(tmp_path, num_cases=6, shape=SHAPE, seed=3, split=(0.6, 0.2, 0.2))
    assert again.read_bytes() == path.read_bytes()
    case = json.loads(again.read_text())["training"][0]
    for key in ("image", "mask"):
        assert (tmp_path / case[key]).read_bytes() == (path.parent / case[key]).read_bytes()
    a = generate_ct_report_case(np.random.default_rng(7), SHAPE)
    b = generate_ct_report_case(np.random.default_rng(7), SHAPE)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2] and a[3] == b[3]


def test_overwrite(tmp_path):
    generate_ct_report_dataset(tmp_path, num_cases=1, shape=SHAPE)
    with pytest.raises(FileExistsError):
        generate_ct_report_dataset(tmp_path, num_cases=1, shape=SHAPE)
    assert generate_ct_report_dataset(tmp_path, num_cases=1, shape=SHAPE, overwrite=True).is_file()


@pytest.mark.parametrize("kwargs", ILL_CASES)
def test_ill_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_ct_report_dataset(tmp_path, **{"num_cases": 1, "shape": SHAPE, **kwargs})
