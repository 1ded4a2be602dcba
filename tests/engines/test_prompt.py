from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized

from common.data import ReferenceSet, write_nifti
from common.engines import STRATEGIES, InContextPrompt
from common.networks import iris_small

KEYS = ["image", "label"]
# the two labelled cubes of every reference volume: label value -> (corner, size) on the 24^3 grid
CUBES = {1: ((3, 3, 3), 8), 2: ((13, 12, 12), 9)}
TOKENS, CHANNELS = 5, 64  # iris_small: 4 query tokens + 1, channels[-1]

# [strategy, classes requested, expected class map]
TEST_CASES = [
    ["one_shot", None, {"cube_a": 1, "cube_b": 2}],
    ["ensemble", None, {"cube_a": 1, "cube_b": 2}],
    ["ensemble", ["cube_b"], {"cube_b": 2}],
    ["ensemble", "cube_a", {"cube_a": 1}],
    ["tuning", ["cube_b", "cube_a"], {"cube_b": 2, "cube_a": 1}],
]

ILL_CASES = [
    {"strategy": "few_shot"},
    {"tuning_steps": -1},
    {"tuning_lr": 0.0},
]


def _preprocessing() -> Compose:
    return Compose(
        [
            LoadImaged(KEYS, image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(KEYS, allow_missing_keys=True),
            Resized(KEYS, spatial_size=(16, 16, 16), mode=["trilinear", "nearest"], allow_missing_keys=True),
        ]
    )


def _write_case(folder: Path, name: str, seed: int, cubes: dict = CUBES) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    label = np.zeros((24, 24, 24), dtype=np.uint8)
    for value, (corner, size) in cubes.items():
        label[tuple(slice(c, c + size) for c in corner)] = value
    image = (rng.normal(0.0, 0.1, label.shape) + 0.4 * label).astype(np.float32)
    write_nifti(image, (1.0, 1.0, 1.0), folder / f"{name}.nii.gz")
    write_nifti(label, (1.0, 1.0, 1.0), folder / f"{name}_label.nii.gz")
    return {"image": f"{name}.nii.gz", "label": f"{name}_label.nii.gz"}


def _write_references(path: Path, refs: list[dict], classes: dict | None = None) -> Path:
    classes = {"cube_a": 1, "cube_b": 2} if classes is None else classes
    path.write_text(json.dumps({"classes": classes, "references": refs}))
    return path


@pytest.fixture(scope="module")
def refs_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("refs")
    refs = [_write_case(folder, f"ref{i}", seed=i) for i in range(3)]
    _write_references(folder / "references.json", refs)
    _write_references(folder / "first_only.json", refs[:1])
    return folder


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return iris_small().eval()


def _prompt(references, **kwargs) -> InContextPrompt:
    return InContextPrompt(references=references, preprocessing=_preprocessing(), **kwargs)


def _loaded(folder: Path, names: list[str], values: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """References preprocessed and stacked by hand: ``(1, R, 1, *S)`` and ``(1, R, K, *S)``."""
    pre = _preprocessing()
    items = [pre({"image": str(folder / f"{n}.nii.gz"), "label": str(folder / f"{n}_label.nii.gz")}) for n in names]
    images = torch.stack([torch.as_tensor(d["image"]).float() for d in items])[None]
    masks = torch.stack([torch.cat([(d["label"] == v) for v in values]).float() for d in items])[None]
    return images.as_subclass(torch.Tensor), masks.as_subclass(torch.Tensor)


@pytest.mark.parametrize("strategy, classes, expected", TEST_CASES)
def test_strategy_shapes_and_classes(refs_dir, net, strategy, classes, expected):
    prompt = _prompt(refs_dir / "references.json", strategy=strategy, classes=classes, tuning_steps=2)
    embeddings = prompt.encode(net)
    assert embeddings.shape == (1, len(expected), TOKENS, CHANNELS)
    assert prompt.classes == expected
    assert list(prompt.classes) == list(expected)  # channel order follows the request
    assert not embeddings.requires_grad


def test_memory_strategy_uses_the_bank(net):
    torch.manual_seed(1)
    stored = torch.randn(3, TOKENS, CHANNELS)
    net.memory_bank.update(["liver", "spleen", "kidney"], stored)
    try:
        prompt = InContextPrompt(strategy="memory")
        embeddings = prompt.encode(net)
        assert embeddings.shape == (1, 3, TOKENS, CHANNELS)
        assert torch.equal(embeddings[0], net.memory_bank.retrieve(["liver", "spleen", "kidney"]))
        assert prompt.classes == {"liver": 1, "spleen": 2, "kidney": 3}
        prompt = InContextPrompt(strategy="memory", classes=["kidney", "liver"])
        assert torch.equal(prompt.encode(net)[0], stored[[2, 0]])
        assert prompt.classes == {"kidney": 1, "liver": 2}
    finally:
        net.memory_bank.load_state_dict(type(net.memory_bank)(TOKENS, CHANNELS).state_dict())


def test_memory_ensemble_blends_known_classes_and_keeps_the_others(refs_dir, net):
    """cube_a is in the bank: its embedding is the weighted mean; cube_b is not: it stays the reference ensemble."""
    ensemble = _prompt(refs_dir / "references.json", strategy="ensemble").encode(net)
    assert list(_prompt(refs_dir / "references.json").reference_set().classes) == ["cube_a", "cube_b"]
    torch.manual_seed(2)
    stored = torch.randn(1, TOKENS, CHANNELS)
    net.memory_bank.update(["cube_a"], stored)
    try:
        for weight in (0.0, 0.25, 1.0):
            prompt = _prompt(refs_dir / "references.json", strategy="memory_ensemble", memory_weight=weight)
            blended = prompt.encode(net)
            torch.testing.assert_close(blended[0, 0], weight * stored[0] + (1 - weight) * ensemble[0, 0])
            assert torch.equal(blended[0, 1], ensemble[0, 1])
            assert prompt.classes == {"cube_a": 1, "cube_b": 2}
    finally:
        net.memory_bank.load_state_dict(type(net.memory_bank)(TOKENS, CHANNELS).state_dict())
    with pytest.raises(ValueError, match="memory_weight should be in"):
        InContextPrompt(strategy="memory_ensemble", memory_weight=1.5)


def test_one_shot_uses_only_the_first_reference(refs_dir, net):
    one_shot = _prompt(refs_dir / "references.json", strategy="one_shot").encode(net)
    ensemble_of_first = _prompt(refs_dir / "first_only.json", strategy="ensemble").encode(net)
    ensemble_of_all = _prompt(refs_dir / "references.json", strategy="ensemble").encode(net)
    assert torch.equal(one_shot, ensemble_of_first)
    assert not torch.allclose(one_shot, ensemble_of_all)


def test_ensemble_equals_encode_task_on_stacked_references(refs_dir, net):
    embeddings = _prompt(refs_dir / "references.json", strategy="ensemble", classes=["cube_b", "cube_a"]).encode(net)
    images, masks = _loaded(refs_dir, ["ref0", "ref1", "ref2"], [2, 1])
    assert masks.shape == (1, 3, 2, 16, 16, 16) and bool(masks.flatten(3).amax(-1).all())
    with torch.no_grad():
        expected = net.encode_task(images, masks)
    torch.testing.assert_close(embeddings, expected)


def test_reference_set_in_memory_equals_file(refs_dir, net):
    refs = [{k: str(refs_dir / f"ref{i}{s}.nii.gz") for k, s in [("image", ""), ("label", "_label")]} for i in (0, 1)]
    in_memory = _prompt(ReferenceSet({"cube_a": 1}, refs), strategy="ensemble").encode(net)
    images, masks = _loaded(refs_dir, ["ref0", "ref1"], [1])
    with torch.no_grad():
        torch.testing.assert_close(in_memory, net.encode_task(images, masks))


def test_encode_restores_training_mode(refs_dir, net):
    net.train()
    try:
        eager = _prompt(refs_dir / "references.json").encode(net)
        assert net.training
    finally:
        net.eval()
    torch.testing.assert_close(eager, _prompt(refs_dir / "references.json").encode(net))


def test_tuning_optimises_only_the_embeddings(refs_dir, net):
    frozen = {"encoder.stem.conv1.conv.weight", "head.bias"}
    for name, p in net.named_parameters():
        p.requires_grad_(name not in frozen)  # a mix of flags, which tuning must give back as found
    flags = {name: p.requires_grad for name, p in net.named_parameters()}
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    bank_before = {k: v.clone() for k, v in net.memory_bank.state_dict().items() if isinstance(v, torch.Tensor)}
    try:
        ensemble = _prompt(refs_dir / "references.json", strategy="ensemble").encode(net)
        prompt = _prompt(refs_dir / "references.json", strategy="tuning", tuning_steps=6, tuning_lr=0.05)
        tuned = prompt.encode(net)
        assert tuned.shape == ensemble.shape
        assert not torch.allclose(tuned, ensemble)
        assert len(prompt.tuning_losses) == 6
        assert prompt.tuning_losses[-1] < prompt.tuning_losses[0]
        for name, p in net.named_parameters():
            assert torch.equal(p, before[name]), name
            assert p.requires_grad == flags[name], name
            assert p.grad is None, name
        for key, value in bank_before.items():
            assert torch.equal(net.memory_bank.state_dict()[key], value)
        assert not net.training
    finally:
        for p in net.parameters():
            p.requires_grad_(True)


def test_tuning_with_zero_steps_is_the_ensemble(refs_dir, net):
    ensemble = _prompt(refs_dir / "references.json", strategy="ensemble").encode(net)
    tuned = _prompt(refs_dir / "references.json", strategy="tuning", tuning_steps=0).encode(net)
    assert torch.equal(tuned, ensemble)


@pytest.mark.parametrize("kwargs", ILL_CASES)
def test_ill_arguments(kwargs):
    with pytest.raises(ValueError):
        InContextPrompt(**kwargs)


def test_strategies():
    assert STRATEGIES == ("one_shot", "ensemble", "memory", "tuning", "memory_ensemble")
    prompt = InContextPrompt()
    prompt.strategy = "memory"
    assert prompt.strategy == "memory"
    with pytest.raises(ValueError):
        prompt.strategy = "zero_shot"


def test_empty_reference_mask_names_the_file(tmp_path, net):
    good = _write_case(tmp_path, "good", seed=0)
    empty = _write_case(tmp_path, "empty", seed=1, cubes={})
    path = _write_references(tmp_path / "refs.json", [good, empty])
    with pytest.raises(ValueError, match=r"empty_label\.nii\.gz.*empty"):
        _prompt(path).encode(net)


def test_absent_label_value_names_the_files(tmp_path, net):
    only_a = _write_case(tmp_path, "only_a", seed=0, cubes={1: CUBES[1]})
    path = _write_references(tmp_path / "refs.json", [only_a], {"cube_a": 1, "cube_c": 3})
    with pytest.raises(ValueError, match=r"only_a_label\.nii\.gz.*label value 3 \('cube_c'\)"):
        _prompt(path).encode(net)


def test_class_absent_from_some_references_is_allowed(tmp_path, net):
    both = _write_case(tmp_path, "both", seed=0)
    only_a = _write_case(tmp_path, "only_a", seed=1, cubes={1: CUBES[1]})
    path = _write_references(tmp_path / "refs.json", [both, only_a])
    embeddings = _prompt(path).encode(net)
    images, masks = _loaded(tmp_path, ["both", "only_a"], [1, 2])
    with torch.no_grad():
        torch.testing.assert_close(embeddings[:, 1], net.encode_task(images[:, 0], masks[:, 0])[:, 1])
        torch.testing.assert_close(embeddings, net.encode_task(images, masks))


def test_unreadable_reference_names_the_file(tmp_path, net):
    good = _write_case(tmp_path, "good", seed=0)
    missing = {"image": "missing.nii.gz", "label": good["label"]}
    path = _write_references(tmp_path / "refs.json", [good, missing])
    with pytest.raises(ValueError, match=r"missing\.nii\.gz.*cannot be loaded"):
        _prompt(path).encode(net)


def test_corrupt_reference_names_the_file(tmp_path, net):
    good = _write_case(tmp_path, "good", seed=0)
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a nifti file at all")
    path = _write_references(tmp_path / "refs.json", [{"image": "corrupt.nii.gz", "label": good["label"]}])
    with pytest.raises(ValueError, match=r"corrupt\.nii\.gz"):
        _prompt(path).encode(net)


def test_memory_with_an_empty_bank_raises(net):
    assert net.memory_bank.known_classes == []
    with pytest.raises(ValueError, match="memory bank is empty"):
        InContextPrompt(strategy="memory").encode(net)


def test_memory_with_an_unknown_class_raises(net):
    net.memory_bank.update(["liver"], torch.zeros(1, TOKENS, CHANNELS))
    try:
        with pytest.raises(KeyError, match="pancreas"):
            InContextPrompt(strategy="memory", classes=["liver", "pancreas"]).encode(net)
    finally:
        net.memory_bank.load_state_dict(type(net.memory_bank)(TOKENS, CHANNELS).state_dict())


def test_unknown_class_names_the_file(refs_dir, net):
    with pytest.raises(ValueError, match=r"references\.json.*\['pancreas'\]"):
        _prompt(refs_dir / "references.json", classes=["cube_a", "pancreas"]).encode(net)


def test_missing_references_file_names_it(tmp_path, net):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        _prompt(tmp_path / "nowhere.json").encode(net)


@pytest.mark.parametrize(
    "with_references, with_preprocessing, message", [[False, True, "needs references"], [True, False, "preprocessing"]]
)
def test_reference_strategy_without_references_or_preprocessing(
    refs_dir, net, with_references, with_preprocessing, message
):
    prompt = InContextPrompt(
        references=refs_dir / "references.json" if with_references else None,
        preprocessing=_preprocessing() if with_preprocessing else None,
    )
    with pytest.raises(ValueError, match=message):
        prompt.encode(net)
