from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized, Transform

from common.data import (
    EpisodeDataset,
    ReferenceSet,
    StructureClass,
    generate_synthetic_3d,
    list_images,
    load_datalist,
    load_datalists,
    load_references,
    references_from_datalist,
    write_references,
)

KEYS = ["image", "label"]
# small structures, so that 24 x 24 x 16 volumes hold several classes each; "ring_torus" is a held-out name
CLASSES = [
    StructureClass("ball", "ellipsoid", 200.0, size_range_mm=(6.0, 10.0)),
    StructureClass("box", "cuboid", -200.0, size_range_mm=(6.0, 10.0)),
    StructureClass("egg", "ellipsoid", 500.0, size_range_mm=(6.0, 10.0)),
    StructureClass("ring_torus", "torus", 240.0, size_range_mm=(8.0, 10.0)),
]

# [EpisodeDataset kwargs, K, R]
TEST_CASES = [
    [{"classes_per_episode": 2, "references_per_episode": 1}, 2, 1],
    [{"classes_per_episode": 3, "references_per_episode": 2}, 3, 2],
    [{"classes_per_episode": 6, "references_per_episode": 3}, 6, 3],  # more channels than classes: padding
    [{"classes_per_episode": 2, "references_per_episode": 5}, 2, 5],  # more references than other volumes
]

ILL_CASES = [
    {"classes_per_episode": 0},
    {"references_per_episode": 0},
    {"episodes_per_epoch": 0},
    {"exclude_classes": ["ball", "box", "egg", "ring_torus"]},
    {"num_volumes": 1},
    {"num_volumes": 0},
]

# [references file content, fragment of the message]
ILL_REFERENCES = [
    [{"classes": {"a": 1}, "references": []}, "'references' should be a non-empty list"],
    [{"classes": {"a": 1}}, "'references' should be a non-empty list"],
    [{"classes": {}, "references": [{"image": "i.nii.gz", "label": "l.nii.gz"}]}, "'classes' should map"],
    [{"classes": {"a": "one"}, "references": [{"image": "i.nii.gz", "label": "l.nii.gz"}]}, "should be integers"],
    [{"classes": {"a": [1]}, "references": [{"image": "i.nii.gz", "label": "l.nii.gz"}]}, "should be integers"],
    [{"classes": {"a": 0}, "references": [{"image": "i.nii.gz", "label": "l.nii.gz"}]}, "should be positive"],
    [{"classes": {"a": 1}, "references": [{"image": "i.nii.gz"}]}, "should have 'image' and 'label'"],
]


def _preprocessing() -> Compose:
    return Compose(
        [
            LoadImaged(KEYS),
            EnsureChannelFirstd(KEYS),
            Resized(KEYS, spatial_size=(16, 16, 16), mode=["trilinear", "nearest"]),
        ]
    )


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate_synthetic_3d(
        tmp_path_factory.mktemp("synth"),
        num_cases=4,
        shape=(24, 24, 16),
        classes=CLASSES,
        spacing_range=((1.5, 1.5),) * 3,
        split=(0.5, 0.25, 0.25),
        shape_jitter=0,
    )


@pytest.fixture(scope="module")
def items(synth) -> list[dict]:
    return load_datalists(synth, "training") + load_datalist(synth, "validation") + load_datalist(synth, "test")


def _dataset(items, transform=None, **kwargs) -> EpisodeDataset:
    return EpisodeDataset(items, transform or _preprocessing(), **{"episodes_per_epoch": 4, **kwargs})


@pytest.fixture(scope="module")
def dataset(items) -> EpisodeDataset:
    ds = _dataset(items, classes_per_episode=6, references_per_episode=2)
    _ = ds.volumes
    return ds


def _label_map(ds: EpisodeDataset, index: int) -> torch.Tensor:
    return torch.as_tensor(ds.volumes[index]["label"]).as_subclass(torch.Tensor)[0]


def _value(ds: EpisodeDataset, index: int, name: str) -> int:
    return {n: int(v) for v, n in ds.data[index]["class_names"].items()}[name]


def test_synthetic_volumes_share_classes(dataset):
    # the premise of the episode tests: each volume holds several classes after resampling
    assert len(dataset._present) == 4
    assert all(len(p) >= 2 for p in dataset._present)


@pytest.mark.parametrize("kwargs, k, r", TEST_CASES)
def test_item_shapes_and_values(items, kwargs, k, r):
    ds = _dataset(items, **kwargs)
    assert len(ds) == 4
    torch.manual_seed(0)
    for index in range(len(ds)):
        item = ds[index]
        assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
        assert item["label"].shape == (k, 16, 16, 16)
        assert item["ref_image"].shape == (r, 1, 16, 16, 16)
        assert item["ref_label"].shape == (r, k, 16, 16, 16)
        assert item["class_ids"].shape == (k,) and item["class_ids"].dtype == torch.long
        assert all(type(v) is torch.Tensor for v in item.values())  # no metadata after mixing volumes
        valid = item["class_ids"] >= 0
        n = int(valid.sum())
        assert n >= 1 and bool(valid[:n].all()) and not bool(valid[n:].any())  # valid channels come first
        assert len(set(item["class_ids"][:n].tolist())) == n
        for c in range(k):
            if c < n:
                assert set(item["label"][c].unique().tolist()) <= {0.0, 1.0}
                assert item["label"][c].sum() > 0  # the query shows the class
                assert item["ref_label"][:, c].flatten(1).sum(-1).amax() > 0  # so does some reference
            else:
                assert bool((item["label"][c] == -1.0).all())
                assert not bool(item["ref_label"][:, c].any())
        assert set(item["ref_label"].unique().tolist()) <= {0.0, 1.0}


def test_item_matches_the_drawn_volumes(dataset):
    """Rebuild an episode from the volumes ``_draw_volumes`` picks with the same seed."""
    for seed in range(4):
        torch.manual_seed(seed)
        item = dataset[0]
        torch.manual_seed(seed)
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
        query, classes, refs = dataset._draw_volumes(rng)
        assert item["class_ids"][: len(classes)].tolist() == [dataset.class_names.index(c) for c in classes]
        assert torch.equal(item["image"], torch.as_tensor(dataset.volumes[query]["image"]).as_subclass(torch.Tensor))
        for k, name in enumerate(classes):
            assert torch.equal(item["label"][k], (_label_map(dataset, query) == _value(dataset, query, name)).float())
            for j, r in enumerate(refs):
                expected = (_label_map(dataset, r) == _value(dataset, r, name)).float()
                assert torch.equal(item["ref_label"][j, k], expected)


def test_query_is_never_a_reference(items):
    ds = _dataset(items, classes_per_episode=2, references_per_episode=3)
    _ = ds.volumes
    rng = np.random.default_rng(0)
    queries = set()
    for _ in range(60):
        query, classes, refs = ds._draw_volumes(rng)
        queries.add(query)
        assert query not in refs
        assert len(set(refs)) == 3  # three other volumes exist: no repeats needed
        assert 1 <= len(classes) <= 2
        assert all(c in ds._present[query] for c in classes)
        assert all(any(c in ds._present[r] for r in refs) for c in classes)
    assert queries == {0, 1, 2, 3}


def test_references_repeat_only_when_too_few(items):
    ds = _dataset(items, references_per_episode=6)
    _ = ds.volumes
    rng = np.random.default_rng(1)
    for _ in range(20):
        query, _classes, refs = ds._draw_volumes(rng)
        assert len(refs) == 6 and query not in refs
        assert set(refs) == set(range(4)) - {query}


def test_excluded_classes_never_appear(items):
    ds = _dataset(items, classes_per_episode=4, exclude_classes=["ball"])
    assert ds.class_names == ["box", "egg", "ring_torus"]
    _ = ds.volumes
    assert all("ball" not in p for p in ds._present)
    torch.manual_seed(0)
    for index in range(len(ds)):
        item = ds[index]
        assert "ball" not in [ds.class_names[i] for i in item["class_ids"] if i >= 0]
    rng = np.random.default_rng(0)
    for _ in range(30):
        query, classes, refs = ds._draw_volumes(rng)
        assert "ball" not in classes
    # a ball voxel of the query is background in every valid channel
    torch.manual_seed(0)
    item = ds[0]
    torch.manual_seed(0)
    query, classes, _ = ds._draw_volumes(np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item())))
    ball = _label_map(ds, query) == _value(ds, query, "ball")
    assert ball.any() and not item["label"][: len(classes), ball].any()


def test_dataset_weights_pick_the_dataset(items):
    two = [{**item, "dataset": "a" if i < 2 else "b"} for i, item in enumerate(items)]
    ds = _dataset(two, dataset_weights={"a": 0.0, "b": 1.0})
    _ = ds.volumes
    rng = np.random.default_rng(0)
    for _ in range(20):
        query, _classes, refs = ds._draw_volumes(rng)
        assert query in (2, 3) and refs == [5 - query]


def test_augmentation_applies_per_volume(items):
    calls = []

    def augment(volume):
        calls.append(volume["image"].shape)
        return {**volume, "image": volume["image"] * 0 + len(calls)}

    ds = _dataset(items, references_per_episode=2, augmentation=augment)
    torch.manual_seed(0)
    item = ds[0]
    assert len(calls) == 3  # query and two references, each augmented on its own
    assert bool((item["image"] == 1).all())
    assert item["ref_image"][:, 0].flatten(1).amax(-1).tolist() == [2.0, 3.0]


@pytest.mark.parametrize("kwargs", ILL_CASES)
def test_ill_arguments(items, kwargs):
    kwargs = dict(kwargs)
    data = items[: kwargs.pop("num_volumes", len(items))]
    with pytest.raises(ValueError):
        EpisodeDataset(data, _preprocessing(), **kwargs)


def test_no_shared_class_raises(tmp_path):
    items = []
    for i in range(2):  # two volumes, each with its own class only
        label = np.zeros((16, 16, 16), dtype=np.uint8)
        label[4:10, 4:10, 4:10] = i + 1
        for key, array in (("image", label.astype(np.float32)), ("label", label)):
            nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / f"{key}{i}.nii.gz")
        items.append(
            {"image": str(tmp_path / f"image{i}.nii.gz"), "label": str(tmp_path / f"label{i}.nii.gz"),
             "class_names": {"1": "a", "2": "b"}}
        )
    with pytest.raises(RuntimeError, match="share a class"):
        _dataset(items)[0]


# ---------------------------------------------------------------- datalists


def _write_datalist(folder: Path, **extra) -> Path:
    data = {
        "name": "toy",
        "labels": {"0": "background", "1": "liver", "2": "spleen", "3": "tumour"},
        "heldout_labels": ["tumour"],
        "training": [
            {"image": "images/a.nii.gz", "label": "labels/a.nii.gz"},
            {"image": "/abs/b.nii.gz", "label": "../up/b.nii.gz"},
        ],
        "test": ["images/c.nii.gz"],
        **extra,
    }
    path = folder / "lists" / "datalist.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_load_datalist_resolves_paths(tmp_path):
    path = _write_datalist(tmp_path)
    items = load_datalist(path)
    base = (tmp_path / "lists").resolve()
    assert [i["image"] for i in items] == [str(base / "images" / "a.nii.gz"), "/abs/b.nii.gz"]
    assert [i["label"] for i in items] == [str(base / "labels" / "a.nii.gz"), str(tmp_path.resolve() / "up/b.nii.gz")]
    assert all(i["dataset"] == "toy" for i in items)
    assert items[0]["class_names"] == {"1": "liver", "2": "spleen", "3": "tumour"}
    assert load_datalist(path, "test") == [
        {"image": str(base / "images" / "c.nii.gz"), "dataset": "toy", "class_names": items[0]["class_names"]}
    ]


def test_load_datalist_drops_heldout(tmp_path):
    items = load_datalist(_write_datalist(tmp_path), drop_heldout=True)
    assert all(i["class_names"] == {"1": "liver", "2": "spleen"} for i in items)


def test_load_datalist_errors_name_the_file(tmp_path):
    path = _write_datalist(tmp_path)
    with pytest.raises(KeyError, match="validation"):
        load_datalist(path, "validation")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_datalist(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_datalist(bad)
    no_image = _write_datalist(tmp_path / "x", training=[{"label": "l.nii.gz"}])
    with pytest.raises(ValueError, match="item 0"):
        load_datalist(no_image)


def test_load_datalists_concatenates(tmp_path):
    one, two = _write_datalist(tmp_path / "one"), _write_datalist(tmp_path / "two", name="other")
    items = load_datalists([one, two])
    assert [i["dataset"] for i in items] == ["toy", "toy", "other", "other"]


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_list_images(tmp_path, caplog):
    _touch(tmp_path / "scans", "b.nii.gz", "a.nii.gz", "c.nrrd", "notes.txt", "d.mha")
    _touch(tmp_path / "series", "1.dcm", "2.dcm")
    scans = (tmp_path / "scans").resolve()
    names = ["a.nii.gz", "b.nii.gz", "c.nrrd", "d.mha"]
    assert list_images(str(tmp_path / "scans")) == [{"image": str(scans / n)} for n in names]
    assert list_images(str(tmp_path / "scans" / "*.nii.gz")) == [{"image": str(scans / n)} for n in names[:2]]
    # files that are not slices of one series are cases of their own (tests/data/test_reader.py: real series)
    series = (tmp_path / "series").resolve()
    assert list_images(tmp_path / "series") == [{"image": str(series / "1.dcm")}, {"image": str(series / "2.dcm")}]
    assert list_images(str(tmp_path / "nowhere.nii.gz")) == [{"image": str(tmp_path.resolve() / "nowhere.nii.gz")}]
    listed = tmp_path / "queries.json"
    listed.write_text(json.dumps(["scans/a.nii.gz", "/abs/x.nii.gz"]))
    assert list_images(listed) == [{"image": str(scans / "a.nii.gz")}, {"image": "/abs/x.nii.gz"}]
    assert [i["image"] for i in list_images(_write_datalist(tmp_path))] == [
        str((tmp_path / "lists" / "images" / "c.nii.gz").resolve())
    ]
    both = list_images([str(tmp_path / "scans" / "a.*"), str(tmp_path / "series")])
    assert [i["image"] for i in both] == [str(scans / "a.nii.gz"), str(series / "1.dcm"), str(series / "2.dcm")]
    with caplog.at_level(logging.WARNING, logger="common.data.datalist"):
        assert list_images(str(tmp_path / "scans" / "*.dcm")) == []
    assert "no file matches" in caplog.text and "*.dcm" in caplog.text


def test_list_images_json_without_split(tmp_path):
    path = _write_datalist(tmp_path, test=None)
    data = json.loads(path.read_text())
    del data["test"]
    path.write_text(json.dumps(data))
    with pytest.raises(KeyError, match="datalist.json"):
        list_images(path)


def test_load_references(tmp_path):
    path = tmp_path / "refs" / "references.json"
    path.parent.mkdir()
    path.write_text(json.dumps({
        "classes": {"liver": 1, "spleen": "2"},
        "references": [{"image": "r0.nii.gz", "label": "r0_seg.nii.gz"}, {"image": "/abs/i.nii", "label": "l.nii"}],
        "modality": "CT",
    }))
    refs = load_references(path)
    assert refs.classes == {"liver": 1, "spleen": 2}
    base = path.parent.resolve()
    assert refs.items == [
        {"image": str(base / "r0.nii.gz"), "label": str(base / "r0_seg.nii.gz")},
        {"image": "/abs/i.nii", "label": str(base / "l.nii")},
    ]
    assert refs.source == str(path) and refs.extra["modality"] == "CT"
    assert refs.select(["spleen"]).classes == {"spleen": 2} and refs.select(None) is refs
    with pytest.raises(ValueError, match=r"references\.json.*\['kidney'\]"):
        refs.select(["liver", "kidney"])


def test_load_references_keeps_requested_classes(tmp_path):
    path = tmp_path / "references.json"
    path.write_text(json.dumps({"classes": {"liver": 1, "spleen": 2}, "references": [{"image": "i", "label": "l"}]}))
    assert load_references(path, classes=["spleen"]).classes == {"spleen": 2}


@pytest.mark.parametrize("content, message", ILL_REFERENCES)
def test_load_references_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "my_refs.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        load_references(path)
    assert str(path) in str(error.value)


def test_load_references_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent_refs.json"):
        load_references(tmp_path / "absent_refs.json")


def test_write_references_round_trip(tmp_path):
    items = [{"image": str(tmp_path / "data" / "a.nii.gz"), "label": str(tmp_path / "data" / "a_seg.nii.gz")}]
    path = write_references(tmp_path / "out" / "refs.json", items, {"liver": 1})
    written = json.loads(path.read_text())["references"]
    assert written == [{"image": "../data/a.nii.gz", "label": "../data/a_seg.nii.gz"}]
    refs = load_references(path)
    assert refs.classes == {"liver": 1} and refs.items == [{k: str(Path(v).resolve()) for k, v in items[0].items()}]
    with pytest.raises(FileExistsError):
        write_references(path, items, {"liver": 1})


@pytest.mark.parametrize("classes, num_references", [[None, 1], [None, 3], [["egg"], 1], [["box", "ring_torus"], 2]])
def test_references_from_datalist_covers_classes(items, classes, num_references):
    refs = references_from_datalist(items, classes=classes, num_references=num_references, seed=0)
    assert isinstance(refs, ReferenceSet)
    wanted = [c.name for c in CLASSES] if classes is None else classes
    assert list(refs.classes) == wanted
    assert refs.classes == {c: i + 1 for i, c in enumerate(c.name for c in CLASSES) if c in wanted}
    assert 1 <= len(refs.items) <= num_references
    labels = {i["label"]: i for i in items}
    assert len({r["label"] for r in refs.items}) == len(refs.items)
    shown = set()
    for ref in refs.items:
        assert ref["image"] == labels[ref["label"]]["image"]
        shown |= set(np.unique(np.asarray(nib.load(ref["label"]).dataobj)).tolist())
    assert all(refs.classes[c] in shown for c in wanted)


def test_references_from_datalist_errors(items, tmp_path):
    with pytest.raises(ValueError, match="pancreas"):
        references_from_datalist(items, classes=["pancreas"])
    with pytest.raises(ValueError, match="at least one"):
        references_from_datalist([])
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.uint8), np.eye(4)), empty)
    with pytest.raises(ValueError, match="ball"):
        references_from_datalist([{**items[0], "label": str(empty)}], classes=["ball"])


class _CountingPreprocessing(Transform):
    """The test preprocessing (deterministic, so cached), appending a line to ``log`` per volume it preprocesses
    (from any process)."""

    def __init__(self, log: Path) -> None:
        self.log, self.transform = log, _preprocessing()

    def __call__(self, data):
        with open(self.log, "a") as f:
            f.write(f"{data['image']}\n")
        return self.transform(data)


def test_cache_is_built_once_and_shared_by_workers(items, tmp_path):
    log = tmp_path / "preprocessed.txt"
    ds = _dataset(items, transform=_CountingPreprocessing(log), episodes_per_epoch=6)
    assert len(log.read_text().splitlines()) == len(items)  # built with the dataset, in this process
    loader = DataLoader(ds, batch_size=1, num_workers=2)
    for _ in range(2):  # two epochs, each with two freshly forked workers
        batches = list(loader)
        assert len(batches) == 6 and batches[0]["image"].shape == (1, 1, 16, 16, 16)
    assert len(log.read_text().splitlines()) == len(items)  # no worker preprocessed a volume again
