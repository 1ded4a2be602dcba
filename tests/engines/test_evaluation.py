from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.handlers import MeanDice, from_engine
from monai.transforms import Activationsd, AsDiscreted, Compose, EnsureChannelFirstd, LoadImaged

from common.data import ErrorTolerantDataset, write_nifti
from common.engines import (
    CopyReference,
    Foreground,
    IntensityMatch,
    InContextEvaluator,
    InContextPrompt,
    copy_reference_masks,
    evaluate_strategies,
    per_class_dice_table,
)
from common.networks import iris_small

KEYS = ["image", "label"]
CLASSES = {"cube_a": 1, "cube_b": 2}
SIZE = 16

# [reference shifts along x (one reference each), query shift, expected {baseline: [Dice cube_a, Dice cube_b]}]
# cube_a is 8 voxels wide, cube_b 6: a 2-voxel shift keeps 6/8 and 4/6 of them, Dice 0.75 and 2/3.
COPY_CASES = [
    [[0], 0, {"copy_reference": [1.0, 1.0], "copy_reference_one_shot": [1.0, 1.0]}],
    [[0], 2, {"copy_reference": [0.75, 2 / 3], "copy_reference_one_shot": [0.75, 2 / 3]}],
    # the majority of three references is the unshifted map; one-shot copies the first reference only
    [[2, 0, 0], 0, {"copy_reference": [1.0, 1.0], "copy_reference_one_shot": [0.75, 2 / 3]}],
]

# [ref_mask (B, R, K, S), expected (B, K, S)]
VOTE_CASES = [
    [[[[[1.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]]], [[[1.0, 0.0, 0.0]]]],  # empty refs do not vote
    [[[[[1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0]], [[0.0, 1.0, 0.0]]]], [[[0.0, 1.0, 0.0]]]],
    [[[[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]]], [[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]]],  # one reference: a copy
]


def _write_case(folder: Path, name: str, shift: int) -> dict[str, str]:
    label = np.zeros((SIZE,) * 3, dtype=np.uint8)
    label[2 + shift: 10 + shift, 2:10, 2:10] = 1
    label[8 + shift: 14 + shift, 10:16, 10:16] = 2
    image = (0.3 * label + np.random.default_rng(shift).normal(0.0, 0.05, label.shape)).astype(np.float32)
    return {"image": str(write_nifti(image, (1.0, 1.0, 1.0), folder / f"{name}.nii.gz")),
            "label": str(write_nifti(label, (1.0, 1.0, 1.0), folder / f"{name}_label.nii.gz"))}


def _evaluator(folder: Path, ref_shifts: list[int], query_shift: int) -> InContextEvaluator:
    refs = [_write_case(folder, f"ref{i}", s) for i, s in enumerate(ref_shifts)]
    (folder / "references.json").write_text(json.dumps({"classes": CLASSES, "references": refs}))
    preprocessing = Compose(
        [LoadImaged(KEYS, allow_missing_keys=True), EnsureChannelFirstd(KEYS, allow_missing_keys=True)]
    )
    prompt = InContextPrompt(references=folder / "references.json", preprocessing=preprocessing)
    loader = DataLoader(ErrorTolerantDataset([_write_case(folder, "query", query_shift)], transform=preprocessing),
                        batch_size=1, num_workers=0)
    metric = MeanDice(reduction="mean_batch", save_details=True, output_transform=from_engine(["pred", "label"]))
    torch.manual_seed(0)
    return InContextEvaluator(
        device="cpu", val_data_loader=loader, network=iris_small().eval(), prompt=prompt,
        postprocessing=Compose([Activationsd("pred", sigmoid=True), AsDiscreted("pred", threshold=0.5)]),
        key_val_metric={"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
        additional_metrics={"val_per_class_dice": metric},
    )


@pytest.mark.parametrize("ref_shifts, query_shift, expected", COPY_CASES)
def test_copy_reference_dice(tmp_path, ref_shifts, query_shift, expected):
    evaluator = _evaluator(tmp_path, ref_shifts, query_shift)
    network = evaluator.network
    results = evaluate_strategies(evaluator, [], tmp_path / "out", baselines=list(expected))
    assert list(results) == list(expected)
    for baseline, dice in expected.items():
        assert [results[baseline][c] for c in CLASSES] == pytest.approx(dice, abs=1e-6)
        assert results[baseline]["mean"] == pytest.approx(float(np.mean(dice)), abs=1e-6)
    assert evaluator.network is network and evaluator.prompt.strategy == "ensemble"  # restored after the baselines
    assert json.loads((tmp_path / "out" / "dice_per_strategy.json").read_text()) == results
    table = (tmp_path / "out" / "dice_per_strategy.md").read_text()
    assert table.startswith("| class | " + " | ".join(expected) + " |")


def test_baselines_sit_beside_every_strategy(tmp_path):
    evaluator = _evaluator(tmp_path, [0], 2)
    results = evaluate_strategies(evaluator, ["one_shot"], tmp_path / "out")
    assert list(results) == ["one_shot", "copy_reference"]
    assert set(results["one_shot"]) == set(results["copy_reference"]) == {"cube_a", "cube_b", "mean"}
    assert results["copy_reference"]["cube_a"] == pytest.approx(0.75)
    assert per_class_dice_table(results).splitlines()[0] == "| class | one_shot | copy_reference |"


def test_foreground_baseline_scores_the_whole_foreground(tmp_path):
    evaluator = _evaluator(tmp_path, [0], 2)
    results = evaluate_strategies(evaluator, [], tmp_path / "out", baselines=["foreground"])
    # by hand from the query as written: every class predicted where the image exceeds 0.1
    image = np.asarray(LoadImaged("image")({"image": str(tmp_path / "query.nii.gz")})["image"])
    label = np.asarray(LoadImaged("label")({"label": str(tmp_path / "query_label.nii.gz")})["label"])
    inside = image > 0.1
    for name, value in CLASSES.items():
        truth = label == value
        expected = 2 * (inside & truth).sum() / (inside.sum() + truth.sum())
        assert results["foreground"][name] == pytest.approx(float(expected), abs=1e-6)
    assert results["foreground"]["cube_a"] > 0.5  # the larger cube fills much of the foreground


def test_foreground_network():
    image = torch.tensor([0.0, 0.2, 0.5, 0.05]).view(1, 1, 4, 1, 1)
    embeddings = Foreground().encode_task(torch.zeros(1, 1, 1, 4, 1, 1), torch.zeros(1, 1, 2, 4, 1, 1))
    logits = Foreground().segment(image, embeddings)
    assert logits.shape == (1, 2, 4, 1, 1)
    assert (logits[:, :, :, 0, 0] > 0).tolist() == [[[False, True, True, False]] * 2]


def test_intensity_match_network_by_hand():
    """Reference: class 1 at intensity 0.3, class 2 at 0.8, background 0. The query puts the same tissues elsewhere;
    the baseline follows the intensities, not the place. An intensity no reference shows (0.55) is left to neither
    class, and a class sharing its intensity with another keeps it only where that raises its Dice in the
    references."""
    ref_image = torch.tensor([0.0, 0.3, 0.3, 0.8, 0.8, 0.8, 0.0, 0.0]).view(1, 1, 1, 8, 1, 1)
    ref_mask = torch.stack([ref_image == 0.3, ref_image == 0.8], dim=2).float().squeeze(3)  # (1, 1, 2, 8, 1, 1)
    network = IntensityMatch(bins=10)
    embeddings = network.encode_task(ref_image, ref_mask)
    assert embeddings.shape == (1, 2, 10)
    assert embeddings[0].nonzero().tolist() == [[0, 3], [1, 8]]  # the bins of 0.3 and 0.8
    query = torch.tensor([0.8, 0.0, 0.3, 0.55, 0.3, 0.8, 0.8, 0.05]).view(1, 1, 8, 1, 1)
    logits = network.segment(query, embeddings)
    assert logits.shape == (1, 2, 8, 1, 1)
    predicted = (logits[0, :, :, 0, 0] > 0).tolist()
    assert predicted[0] == [False, False, True, False, True, False, False, False]
    assert predicted[1] == [True, False, False, False, False, True, True, False]
    # one voxel of class 1 at 0.8 among three of class 2: taking 0.8 too would lower class 1's Dice (2/3 -> 4/7)
    mixed = ref_mask.clone()
    mixed[0, 0, 0, 3] = 1.0
    mixed[0, 0, 1, 3] = 0.0
    assert network.encode_task(ref_image, mixed)[0, 0].nonzero().flatten().tolist() == [3]
    # class 1 nowhere in the reference: nothing is kept for it
    assert network.encode_task(ref_image, ref_mask * torch.tensor([0.0, 1.0]).view(1, 1, 2, 1, 1, 1))[0, 0].sum() == 0


def test_intensity_match_beats_copy_where_tissues_move(tmp_path):
    """Two tissues of distinct intensity, the query's shifted: copying the reference misses, intensities do not."""
    evaluator = _evaluator(tmp_path, [0], 2)
    results = evaluate_strategies(evaluator, [], tmp_path / "out", baselines=["copy_reference", "intensity_match"])
    for name in CLASSES:
        assert results["intensity_match"][name] > results["copy_reference"][name]
        assert results["intensity_match"][name] > 0.9


def test_unknown_baseline_raises(tmp_path):
    with pytest.raises(ValueError, match="copy_reference"):
        evaluate_strategies(_evaluator(tmp_path, [0], 0), [], tmp_path / "out", baselines=["chance_level"])


@pytest.mark.parametrize("masks, expected", VOTE_CASES)
def test_copy_reference_masks(masks, expected):
    assert copy_reference_masks(torch.tensor(masks)).tolist() == expected


def test_copy_reference_network():
    net = CopyReference()
    masks = torch.zeros(1, 2, 3, 8, 8, 8)
    masks[:, :, 1, 2:5, 2:5, 2:5] = 1.0
    embeddings = net.encode_task(torch.rand(1, 2, 1, 8, 8, 8), masks)
    assert embeddings.shape == (1, 3, 8, 8, 8)
    logits = net.segment(torch.rand(2, 1, 8, 8, 8), embeddings)
    assert logits.shape == (2, 3, 8, 8, 8)
    assert torch.equal(logits > 0, masks[:, 0].expand(2, -1, -1, -1, -1) > 0)
    with pytest.raises(ValueError, match="grid"):
        net.segment(torch.rand(1, 1, 16, 16, 16), embeddings)
