from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.handlers import MeanDice, from_engine
from monai.transforms import Activationsd, AsDiscreted, Compose, EnsureChannelFirstd, LoadImaged, Resized

from common.data import ErrorTolerantDataset, write_nifti
from common.engines import CasesFailedError, InContextEvaluator, InContextPrompt, labels_to_class_channels
from common.networks import iris_small

KEYS = ["image", "label"]
CLASSES = {"cube_a": 1, "cube_b": 2}

# [label values in the map, values asked for]
CHANNEL_CASES = [
    [[0, 1, 2], [1, 2]],
    [[0, 3, 7, 1], [7, 1]],
    [[0, 2], [2, 5]],  # a value absent from the map gives an empty channel
]


def _preprocessing() -> Compose:
    return Compose(
        [
            LoadImaged(KEYS, allow_missing_keys=True),
            EnsureChannelFirstd(KEYS, allow_missing_keys=True),
            Resized(KEYS, spatial_size=(16, 16, 16), mode=["trilinear", "nearest"], allow_missing_keys=True),
        ]
    )


def _write_case(folder: Path, name: str, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    label = np.zeros((24, 24, 24), dtype=np.uint8)
    a, b = rng.integers(2, 6, size=3), rng.integers(12, 15, size=3)
    label[a[0]: a[0] + 8, a[1]: a[1] + 8, a[2]: a[2] + 8] = 1
    label[b[0]: b[0] + 9, b[1]: b[1] + 9, b[2]: b[2] + 9] = 2
    image = (rng.normal(0.0, 0.1, label.shape) + 0.4 * label).astype(np.float32)
    image_path = write_nifti(image, (1.0, 1.0, 1.0), folder / f"{name}.nii.gz")
    label_path = write_nifti(label, (1.0, 1.0, 1.0), folder / f"{name}_label.nii.gz")
    return {"image": str(image_path), "label": str(label_path)}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("cases")
    ref = _write_case(folder, "ref", seed=0)
    references = folder / "references.json"
    references.write_text(json.dumps({"classes": CLASSES, "references": [ref]}))
    good = [_write_case(folder, f"query{i}", seed=i + 1) for i in range(2)]
    corrupt = {"image": str(folder / "corrupt.nii.gz"), "label": good[0]["label"]}
    Path(corrupt["image"]).write_bytes(b"\x1f\x8b garbage, not a gzip stream nor a NIfTI header" * 8)
    return {"references": references, "good": good, "corrupt": corrupt}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return iris_small().eval()


def _evaluator(net, prompt, data, metric: bool = True) -> InContextEvaluator:
    loader = DataLoader(ErrorTolerantDataset(data, transform=_preprocessing()), batch_size=1, num_workers=0)
    metrics = {"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]), save_details=True)}
    return InContextEvaluator(
        device="cpu",
        val_data_loader=loader,
        network=net,
        prompt=prompt,
        postprocessing=Compose([Activationsd("pred", sigmoid=True), AsDiscreted("pred", threshold=0.5)]),
        key_val_metric=metrics if metric else None,
    )


def _dice_by_hand(net, prompt, items) -> torch.Tensor:
    """Per-case, per-class Dice ``(N, K)`` of thresholded sigmoid predictions, computed without the engine."""
    embeddings = prompt.encode(net)
    pre = _preprocessing()
    rows = []
    for item in items:
        data = pre(dict(item))
        image = torch.as_tensor(data["image"]).as_subclass(torch.Tensor)[None]
        label = torch.as_tensor(data["label"]).as_subclass(torch.Tensor)
        with torch.no_grad():
            pred = torch.sigmoid(net.segment(image, embeddings))[0] >= 0.5
        truth = torch.stack([label[0] == v for v in CLASSES.values()])
        inter = (pred & truth).flatten(1).sum(-1).double()
        rows.append(2 * inter / (pred.flatten(1).sum(-1) + truth.flatten(1).sum(-1)).double())
    return torch.stack(rows)


def test_run_skips_a_corrupt_case_and_scores_the_rest(cases, net):
    prompt = InContextPrompt(references=cases["references"], preprocessing=_preprocessing())
    data = [cases["good"][0], cases["corrupt"], cases["good"][1]]
    evaluator = _evaluator(net, prompt, data)
    # the run completes the good cases and every handler, then raises naming the failed file
    with pytest.raises(CasesFailedError, match="1 case\\(s\\) failed, 2 completed"):
        evaluator.run()
    state = evaluator.state
    assert len(state.case_failures) == 1
    assert state.case_failures[0]["source"] == cases["corrupt"]["image"]
    assert cases["corrupt"]["image"] in state.case_failures[0]["error"]
    assert state.case_sources == [cases["good"][0]["image"], cases["good"][1]["image"]]
    assert state.class_names == list(CLASSES)
    assert state.task_embeddings.shape == (1, 2, 5, 64)
    expected = _dice_by_hand(net, prompt, cases["good"])
    details = torch.as_tensor(state.metric_details["val_mean_dice"]).reshape(-1, 2)
    assert details.shape == (2, 2)
    torch.testing.assert_close(details.double(), expected, rtol=1e-5, atol=1e-6)
    assert state.metrics["val_mean_dice"] == pytest.approx(float(expected.mean()), abs=1e-6)


def test_run_without_failures(cases, net):
    prompt = InContextPrompt(references=cases["references"], preprocessing=_preprocessing(), classes=["cube_b"])
    evaluator = _evaluator(net, prompt, cases["good"])
    evaluator.run()
    assert evaluator.state.case_failures == []
    assert len(evaluator.state.case_sources) == 2
    expected = _dice_by_hand(net, prompt, cases["good"])  # classes narrowed to cube_b: one channel
    assert evaluator.state.metrics["val_mean_dice"] == pytest.approx(float(expected[:, 1].mean()), abs=1e-6)


def test_run_where_every_case_fails(cases, net):
    prompt = InContextPrompt(references=cases["references"], preprocessing=_preprocessing())
    evaluator = _evaluator(net, prompt, [cases["corrupt"]], metric=False)
    with pytest.raises(RuntimeError, match="all 1 case\\(s\\) failed") as err:
        evaluator.run()
    assert cases["corrupt"]["image"] in str(err.value)
    assert [f["source"] for f in evaluator.state.case_failures] == [cases["corrupt"]["image"]]
    assert evaluator.state.case_sources == []


def test_query_without_label(cases, net):
    prompt = InContextPrompt(references=cases["references"], preprocessing=_preprocessing())
    evaluator = _evaluator(net, prompt, [{"image": cases["good"][0]["image"]}], metric=False)
    evaluator.run()
    assert evaluator.state.output[0]["pred"].shape == (2, 16, 16, 16)
    assert evaluator.state.output[0]["label"] is None


def test_empty_query_list_raises(cases, net):
    prompt = InContextPrompt(references=cases["references"], preprocessing=_preprocessing())
    loader = DataLoader(Dataset([]), batch_size=1)
    with pytest.raises(ValueError, match="case list is empty"):
        InContextEvaluator(device="cpu", val_data_loader=loader, network=net, prompt=prompt).run()


@pytest.mark.parametrize("present, values", CHANNEL_CASES)
def test_labels_to_class_channels(present, values):
    torch.manual_seed(0)
    label = torch.tensor(present)[torch.randint(0, len(present), (2, 1, 4, 3, 5))]
    out = labels_to_class_channels(label, values)
    assert out.shape == (2, len(values), 4, 3, 5) and out.dtype == torch.float32
    for b in range(2):
        for k, v in enumerate(values):
            for idx in np.ndindex(4, 3, 5):
                assert out[(b, k, *idx)] == float(label[(b, 0, *idx)] == v)
