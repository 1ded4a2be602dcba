from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.data.dicom import read_dicom
from common.data.synthetic_cxr import (
    CXR_CONCEPTS,
    CXR_DISEASES,
    DISEASE_RULES,
    FIELD_OF_VIEW_MM,
    LESION_CLASSES,
    diseases_from_concepts,
    generate_cxr,
    generate_synthetic_cxr,
    load_lung_mask,
    num_lung_masks,
)

# concepts drawn inside the lung fields (the returned lung mask); cardiomegaly is the heart
IN_LUNG = ("opacity", "consolidation", "nodule", "mass", "effusion", "pneumothorax", "atelectasis", "calcification",
           "fibrosis", "pleural_thickening")

# size, seed
TEST_CASES = [[64, 0], [128, 1], [256, 2]]

ILL_SAMPLE_CASES = [
    {"size": 32},
    {"size": 128.0},
    {"concepts": ["nodule", "dragon"]},
    {"concepts": "nodule"},
    {"concept_prob": 1.5},
    {"lung_mask": np.zeros((64, 64), dtype=bool)},
    {"lung_mask": np.ones((4, 64, 64), dtype=bool)},
]

ILL_CASES = [
    {"num_images": 0},
    {"num_images": 2.5},
    {"size": 48},
    {"seed": -1},
    {"split": (0.5, 0.5, 0.5)},
    {"split": (0.7, 0.3)},
    {"concept_prob": -0.1},
    {"write_dicom_fraction": 2.0},
]


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _samples(count: int, size: int = 96, concept_prob: float = 0.5) -> list[dict]:
    return [generate_cxr(np.random.default_rng(100 + i), size, concept_prob=concept_prob) for i in range(count)]


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return _samples(30)


@pytest.mark.parametrize("size, seed", TEST_CASES)
def test_sample_shapes_range_and_determinism(size, seed):
    first = generate_cxr(np.random.default_rng(seed), size)
    again = generate_cxr(np.random.default_rng(seed), size)
    other = generate_cxr(np.random.default_rng(seed + 10), size)
    image = first["image"]
    assert image.shape == (size, size) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    assert set(first) == {"image", "concepts", "diseases", "masks", "boxes", "lung_mask", "heart_mask"}
    assert list(first["concepts"]) == list(CXR_CONCEPTS) and list(first["diseases"]) == list(CXR_DISEASES)
    np.testing.assert_array_equal(image, again["image"])
    assert first["concepts"] == again["concepts"] and first["diseases"] == again["diseases"]
    assert first["boxes"] == again["boxes"]
    assert not np.array_equal(image, other["image"])


def test_radiograph_orientation(samples):
    # dense is bright: aerated lung darker than the heart and mediastinum, air outside the body darkest
    for sample in samples:
        image, lung, heart = sample["image"], sample["lung_mask"], sample["heart_mask"]
        assert lung.sum() > 0.1 * lung.size and heart.any()
        assert np.median(image[lung]) < np.median(image[heart]) - 0.1
        assert image[:, :3].mean() < np.median(image[lung])  # image edges are outside the trunk


def test_concepts_masks_and_boxes(samples):
    seen = set()
    for sample in samples:
        masks, lung = sample["masks"], sample["lung_mask"]
        assert set(masks) == {name for name, value in sample["concepts"].items() if value}
        assert [box[0] for box in sample["boxes"]] == list(masks)  # one box per drawn concept, in concept order
        for name, x0, y0, x1, y1 in sample["boxes"]:
            mask = masks[name]
            assert mask.dtype == bool and mask.shape == lung.shape and mask.any()
            assert (x0, y0, x1, y1) == _bbox(mask)  # the tightest box holding every mask pixel
            assert not mask[:y0].any() and not mask[y1:].any() and not mask[:, :x0].any() and not mask[:, x1:].any()
            if name in IN_LUNG:
                assert lung[mask].all(), name
            seen.add(name)
        if "cardiomegaly" in masks:
            np.testing.assert_array_equal(masks["cardiomegaly"], sample["heart_mask"])
    assert seen == set(CXR_CONCEPTS)  # 30 images at p=0.5 draw every concept


def test_cardiomegaly_raises_cardiothoracic_ratio():
    ratios = {}
    for enlarged in (False, True):
        ratios[enlarged] = []
        for seed in range(8):
            sample = generate_cxr(np.random.default_rng(seed), 128, concepts=["cardiomegaly"] if enlarged else [])
            x0, _, x1, _ = _bbox(sample["lung_mask"])
            hx0, _, hx1, _ = _bbox(sample["heart_mask"])
            ratios[enlarged].append((hx1 - hx0) / (x1 - x0))
    assert min(ratios[True]) > 0.5 and max(ratios[False]) < 0.5


def test_forced_concepts_and_sizes():
    mm = FIELD_OF_VIEW_MM / 256
    for seed in range(4):
        sample = generate_cxr(np.random.default_rng(seed), 256, concepts=["nodule", "mass"])
        assert {name for name, value in sample["concepts"].items() if value} == {"nodule", "mass"}
        nodule = 2.0 * np.sqrt(sample["masks"]["nodule"].sum() / np.pi) * mm  # equivalent diameter
        mass = 2.0 * np.sqrt(sample["masks"]["mass"].sum() / np.pi) * mm
        assert 3.5 <= nodule <= 17.0 and 22.0 <= mass <= 70.0
    none = generate_cxr(np.random.default_rng(0), 128, concepts=[])
    assert not any(none["concepts"].values()) and none["masks"] == {} and none["boxes"] == []


def test_given_lung_mask_is_used():
    rows, cols = np.mgrid[0:64, 0:64]
    lungs = ((rows - 34) / 22.0) ** 2 + ((np.abs(cols - 32) - 15) / 10.0) ** 2 <= 1.0
    sample = generate_cxr(np.random.default_rng(0), 128, lung_mask=lungs, concepts=["nodule"])
    resized = np.asarray(Image.fromarray(lungs.astype(np.uint8) * 255).resize((128, 128), Image.BILINEAR)) > 127
    assert sample["lung_mask"].any() and not (sample["lung_mask"] & ~resized).any()
    assert resized[sample["masks"]["nodule"]].all()


def test_disease_rules_frequencies():
    rng = np.random.default_rng(0)
    trials = 2000
    for disease, rule in DISEASE_RULES.items():
        cases = [(needed, p) for needed, p in rule.clauses] + [((), rule.otherwise)]
        for needed, probability in cases:
            # only the clause's own concepts present, so no earlier clause matches
            concepts = {name: int(name in needed) for name in CXR_CONCEPTS}
            rate = np.mean([diseases_from_concepts(concepts, rng)[disease] for _ in range(trials)])
            assert abs(rate - probability) < 0.04, (disease, needed, rate, probability)
    healthy = {name: 0 for name in CXR_CONCEPTS}
    labels = [diseases_from_concepts(healthy, rng) for _ in range(500)]
    assert all(d["no_finding"] == int(not any(v for k, v in d.items() if k != "no_finding")) for d in labels)
    assert 0.85 < np.mean([d["no_finding"] for d in labels]) < 0.95  # 1 - background rates
    with pytest.raises(ValueError, match="CXR_CONCEPTS"):
        diseases_from_concepts({"dragon": 1}, rng)


def test_generated_diseases_follow_rules():
    samples = _samples(80, size=64, concept_prob=0.3)
    pneumonia = [s["diseases"]["pneumonia"] for s in samples
                 if s["concepts"]["consolidation"] or s["concepts"]["opacity"]]
    others = [s["diseases"]["pneumonia"] for s in samples
              if not (s["concepts"]["consolidation"] or s["concepts"]["opacity"])]
    assert len(pneumonia) > 20 and np.mean(pneumonia) > 0.75 and np.mean(others) < 0.15
    for sample in samples:
        expected = int(not any(sample["concepts"].values())
                       and not any(v for k, v in sample["diseases"].items() if k != "no_finding"))
        assert sample["diseases"]["no_finding"] == expected


@pytest.mark.skipif(num_lung_masks() == 0, reason="torchxrayvision (the lung masks) is not installed")
def test_lung_masks_from_torchxrayvision():
    assert num_lung_masks() == 517
    mask = load_lung_mask(0, 64)
    assert mask.shape == (64, 64) and mask.dtype == bool and 0.1 < mask.mean() < 0.7
    with pytest.raises(ValueError, match="index"):
        load_lung_mask(num_lung_masks())


def _split_counts(datalist: dict) -> tuple[int, int, int]:
    return len(datalist["training"]), len(datalist["validation"]), len(datalist["test"])


def test_generate_dataset(tmp_path):
    out = tmp_path / "cxr"
    path = generate_synthetic_cxr(out, num_images=10, size=64, seed=3, concept_prob=0.4)
    datalist = json.loads(path.read_text())
    assert path == out / "datalist.json"
    assert datalist["name"] == "synthetic_cxr" and _split_counts(datalist) == (6, 2, 2)  # round(1.5) == 2 each
    assert datalist["concepts"] == list(CXR_CONCEPTS) and datalist["diseases"] == list(CXR_DISEASES)
    assert datalist["lesion_classes"] == list(LESION_CLASSES)
    items = datalist["training"] + datalist["validation"] + datalist["test"]
    assert [item["image"] for item in items] == [f"images/cxr_{i:04d}.png" for i in range(10)]
    for item in items:
        image = np.asarray(Image.open(out / item["image"]))
        assert image.shape == (64, 64) and image.dtype == np.uint8
        drawn = [name for name, value in zip(CXR_CONCEPTS, item["concepts"]) if value]
        assert sorted(item["concept_masks"]) == sorted(drawn) and len(item["diseases"]) == len(CXR_DISEASES)
        assert [LESION_CLASSES[box[0]] for box in item["boxes"]] == drawn
        for (class_index, x0, y0, x1, y1) in item["boxes"]:
            mask = np.asarray(Image.open(out / item["concept_masks"][LESION_CLASSES[class_index]])) > 0
            assert (x0, y0, x1, y1) == _bbox(mask)
    assert len(list((out / "masks").iterdir())) == sum(len(item["concept_masks"]) for item in items)

    again = generate_synthetic_cxr(tmp_path / "again", num_images=10, size=64, seed=3, concept_prob=0.4)
    assert again.read_text() == path.read_text()
    assert (tmp_path / "again/images/cxr_0004.png").read_bytes() == (out / "images/cxr_0004.png").read_bytes()

    with pytest.raises(FileExistsError, match="overwrite"):
        generate_synthetic_cxr(out, num_images=2, size=64)
    generate_synthetic_cxr(out, num_images=2, size=64, overwrite=True)
    assert _split_counts(json.loads(path.read_text())) == (2, 0, 0)


def test_dicom_output_reads_like_png(tmp_path):
    kwargs = {"num_images": 6, "size": 64, "seed": 1, "split": (1.0, 0.0, 0.0)}
    png = json.loads(generate_synthetic_cxr(tmp_path / "png", **kwargs).read_text())["training"]
    dcm = json.loads(generate_synthetic_cxr(tmp_path / "dcm", write_dicom_fraction=1.0, **kwargs).read_text())
    photometric = set()
    for png_item, dcm_item in zip(png, dcm["training"]):
        assert dcm_item["image"].endswith(".dcm") and dcm_item["boxes"] == png_item["boxes"]
        array, meta = read_dicom(tmp_path / "dcm" / dcm_item["image"])
        reference = np.asarray(Image.open(tmp_path / "png" / png_item["image"]), dtype=np.float64)
        photometric.add(meta["PhotometricInterpretation"])
        assert array.shape == (64, 64) and meta["Modality"] == "DX"
        # both photometric interpretations come back "dense is bright", an affine map of the PNG values
        assert np.corrcoef(array.ravel(), reference.ravel())[0, 1] > 0.999
        np.testing.assert_allclose(meta["spacing"][:2], FIELD_OF_VIEW_MM / 64, rtol=1e-5)
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


@pytest.mark.parametrize("kwargs", ILL_SAMPLE_CASES)
def test_ill_sample_arguments(kwargs):
    with pytest.raises(ValueError):
        generate_cxr(np.random.default_rng(0), **{"size": 64, **kwargs})


@pytest.mark.parametrize("kwargs", ILL_CASES)
def test_ill_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_synthetic_cxr(tmp_path, **{"num_images": 2, "size": 64, **kwargs})
    assert not (tmp_path / "datalist.json").exists()


def test_parametric_lungs_without_torchxrayvision(monkeypatch):
    import common.data.synthetic_cxr as synthetic_cxr

    monkeypatch.setattr(synthetic_cxr, "num_lung_masks", lambda: 0)
    sample = generate_cxr(np.random.default_rng(0), 96, concepts=["nodule", "effusion"])
    assert sample["concepts"]["nodule"] == 1 and sample["lung_mask"].mean() > 0.1
    assert sample["lung_mask"][sample["masks"]["nodule"]].all()
