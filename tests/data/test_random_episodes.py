from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized

from scipy import ndimage

from common.data import (
    EpisodeDataset,
    MixedEpisodeDataset,
    RandomEpisodeDataset,
    StructureClass,
    generate_synthetic_3d,
    load_datalist,
    random_anatomy,
    random_appearance,
    random_episode,
    render_view,
)
from common.data.random_episodes import _draw_classes, _Painter
from common.engines import prepare_episode_batch
from common.handlers import DatasetEpochHandler, MemoryBankUpdater
from common.losses import IgnoreChannelsLoss
from common.networks import iris_small

KEYS = ["image", "label"]
CLASSES = [
    StructureClass("ball", "ellipsoid", 200.0, size_range_mm=(6.0, 10.0)),
    StructureClass("box", "cuboid", -200.0, size_range_mm=(6.0, 10.0)),
    StructureClass("egg", "ellipsoid", 500.0, size_range_mm=(6.0, 10.0)),
]

# [RandomEpisodeDataset kwargs, K, R, spatial size]
TEST_CASES = [
    [{"image_size": (16, 16, 16), "classes_per_episode": 1, "references_per_episode": 1}, 1, 1, (16, 16, 16)],
    [{"image_size": (24, 16, 32), "classes_per_episode": 3, "references_per_episode": 3}, 3, 3, (24, 16, 32)],
    [{"image_size": (32, 32, 32), "classes_per_episode": 5, "references_per_episode": 2, "min_references": 2},
     5, 2, (32, 32, 32)],
]

ILL_CASES = [
    {"classes_per_episode": 0},
    {"references_per_episode": 0},
    {"episodes_per_epoch": 0},
    {"image_size": (8, 16, 16)},
    {"image_size": (16, 16)},
    {"min_references": 0},
    {"min_references": 4, "references_per_episode": 3},
    {"seed": -1},
    {"max_structures": 0},
]

SMALL = {"image_size": (16, 16, 16), "episodes_per_epoch": 6}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _used(item: dict) -> int:
    return int((item["label"].flatten(1).amin(1) >= 0).sum())


def _refs(item: dict) -> int:
    return int(item["ref_label"].flatten(1).amax(1).gt(0).sum())


@pytest.mark.parametrize("kwargs, k, r, size", TEST_CASES)
def test_item_layout(kwargs, k, r, size):
    ds = RandomEpisodeDataset(episodes_per_epoch=3, **kwargs)
    assert len(ds) == 3
    for index in range(len(ds)):
        item = ds[index]
        assert item["image"].shape == (1, *size) and item["image"].dtype == torch.float32
        assert item["label"].shape == (k, *size) and item["label"].dtype == torch.float32
        assert item["ref_image"].shape == (r, 1, *size) and item["ref_image"].dtype == torch.float32
        assert item["ref_label"].shape == (r, k, *size) and item["ref_label"].dtype == torch.float32
        assert item["class_ids"].shape == (k,) and item["class_ids"].dtype == torch.long
        assert bool((item["class_ids"] == -1).all())  # no vocabulary: a memory bank leaves them out
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        n, refs = _used(item), _refs(item)
        assert 1 <= n <= k and kwargs.get("min_references", 1) <= refs <= r
        assert set(item["label"][:n].unique().tolist()) <= {0.0, 1.0}
        assert bool((item["label"][n:] == -1.0).all())  # unused query channels are ignored
        assert set(item["ref_label"].unique().tolist()) <= {0.0, 1.0}
        assert not bool(item["ref_label"][:, n:].any())
        # every class shows in the query and in every drawn reference; padding slots are empty and black
        assert bool((item["label"][:n].flatten(1).sum(1) > 0).all())
        assert bool((item["ref_label"][:refs, :n].flatten(2).sum(2) > 0).all())
        assert not bool(item["ref_label"][refs:].any()) and not bool(item["ref_image"][refs:].any())


@pytest.mark.parametrize("kwargs", ILL_CASES)
def test_ill_arguments(kwargs):
    with pytest.raises(ValueError):
        RandomEpisodeDataset(**kwargs)


def test_same_seed_same_episode_other_seed_other_episode():
    a, b, c = (RandomEpisodeDataset(seed=s, **SMALL) for s in (3, 3, 4))
    for index in range(3):
        assert _equal(a[index], b[index])
        assert not torch.equal(a[index]["image"], c[index]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])


def test_epochs_draw_new_episodes():
    ds = RandomEpisodeDataset(seed=0, **SMALL)
    first = ds[2]
    ds.set_epoch(1)
    assert _equal(ds[2], ds.episode(len(ds) + 2)) and not torch.equal(ds[2]["image"], first["image"])
    ds.set_epoch(0)
    assert _equal(ds[2], first)


def test_independent_of_worker_count():
    ds = RandomEpisodeDataset(seed=5, **SMALL)
    ds.set_epoch(2)
    batches = {w: list(DataLoader(ds, batch_size=2, num_workers=w)) for w in (0, 2)}
    assert len(batches[0]) == len(batches[2]) == 3
    assert all(_equal(x, y) for x, y in zip(batches[0], batches[2]))
    assert _equal(batches[0][1], {k: torch.stack([ds.episode(14)[k], ds.episode(15)[k]]) for k in batches[0][1]})


def test_references_and_query_differ_but_share_classes():
    ds = RandomEpisodeDataset(image_size=(32, 32, 32), references_per_episode=2, min_references=2, episodes_per_epoch=4)
    for index in range(len(ds)):
        item = ds[index]
        n = _used(item)
        for r in range(2):
            assert not torch.equal(item["ref_image"][r], item["image"])  # deformed, cropped, re-synthesised
            assert not torch.equal(item["ref_label"][r, :n], item["label"][:n])
            assert bool((item["ref_label"][r, :n].flatten(1).sum(1) > 0).all())
        assert not torch.equal(item["ref_label"][0, :n], item["ref_label"][1, :n])


def test_appearance_varies_per_episode_not_per_label():
    """A class's contrast to its surroundings changes sign between episodes, and no class is a flat intensity."""
    ds = RandomEpisodeDataset(image_size=(32, 32, 32), classes_per_episode=1, references_per_episode=1,
                              episodes_per_epoch=12)
    contrasts = []
    for index in range(len(ds)):
        item = ds[index]
        image, mask = item["image"][0], item["label"][0] > 0
        assert float(image[mask].std()) > 0.0
        contrasts.append(float(image[mask].mean() - image[~mask].mean()))
    assert min(contrasts) < -0.05 and max(contrasts) > 0.05


def test_anatomy_has_many_structures_and_nested_groups():
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for _ in range(5):
        anatomy = random_anatomy(rng, (40, 40, 40))
        assert anatomy.label.shape == (40, 40, 40) and anatomy.label.dtype == np.int16
        assert 0 <= anatomy.label.min() and anatomy.label.max() <= anatomy.num_labels
        labels.append(len(np.unique(anatomy.label)))
        groups += anatomy.groups
        appearance = random_appearance(rng, anatomy.num_labels)
        image, label = render_view(rng, anatomy, appearance, (32, 32, 32))
        assert image.shape == label.shape == (32, 32, 32) and image.dtype == np.float32
        assert set(np.unique(label)) <= set(range(anatomy.num_labels + 1))
    assert min(labels) >= 4 and max(labels) >= 10
    assert groups and all(len(g) >= 2 for g in groups)


def test_tissue_ribbon_surrounds_its_core_and_reappears_inside_it():
    """The brain-like structure: a ribbon label on the outside of the structure, a core label inside, and in some
    draws islands of the ribbon's label within the core, so one class lies in several disjoint places."""
    islands = []
    for seed in range(6):
        painter = _Painter(np.random.default_rng(seed), np.zeros((48, 48, 48), dtype=np.int16), None)
        painter.tissues(48.0)
        ribbon, core = painter.groups[-1]
        whole = np.isin(painter.label, (ribbon, core))
        surface = whole & ~ndimage.binary_erosion(whole, border_value=1)
        # the ribbon wraps the core (measured 0.76-0.93: where folds make it thinner than a voxel, the core shows)
        assert (painter.label[surface] == ribbon).mean() > 0.7 > (painter.label[whole] == ribbon).mean()
        assert (painter.label == core).sum() > 0
        inner = ndimage.binary_erosion(whole, iterations=3)
        islands.append(int((painter.label[inner] == ribbon).sum() > 0))
    assert 0 < sum(islands)


def test_class_draws_often_pair_the_parts_of_one_structure():
    """With group_fraction 0.4 about that share of the episodes set parts of one multi-part structure side by side
    (the gray/white matter case; measured 0.365); the plain draw among ~25 candidates rarely does (0.06)."""
    anatomy = random_anatomy(np.random.default_rng(1), (40, 40, 40))
    labels = [anatomy.label] * 2
    paired = {}
    for fraction in (0.0, 0.4):
        paired[fraction] = 0
        for seed in range(200):
            classes = _draw_classes(np.random.default_rng(seed), labels, anatomy, 3, group_fraction=fraction)
            singles = {c[0] for c in classes if len(c) == 1}
            paired[fraction] += any(len(singles & set(g)) >= 2 for g in anatomy.groups)
    assert paired[0.0] / 200 < 0.15 and 0.25 < paired[0.4] / 200 < 0.7, paired


def test_structure_weights_choose_the_kinds_drawn():
    rng = np.random.default_rng(0)
    only = random_anatomy(rng, (40, 40, 40), max_structures=3, structure_weights={"tissues": 1.0})
    assert only.groups and all(len(g) == 2 for g in only.groups)  # every structure a ribbon and its core
    for bad in ({"tissue": 1.0}, {"blob": -1.0}, {"blob": 0.0}):
        with pytest.raises(ValueError, match="structure_weights should map kinds"):
            random_anatomy(rng, (40, 40, 40), structure_weights=bad)
    with pytest.raises(ValueError, match="group_fraction should be in"):
        RandomEpisodeDataset(image_size=(16, 16, 16), group_fraction=1.5)


def test_low_contrast_appearance_is_ct_like():
    """CT-like episodes put most labels within a narrow band of intensities and keep each label's intensity from view
    to view (one fixed window); the default appearance spreads labels over [0, 1] and windows each view apart.
    Measured over 10 anatomies: band (20th-80th percentile of label means) median 0.084 against 0.594, cross-view
    change of a label's mean intensity median 0.010 against 0.047."""
    measured = {}
    for fraction in (0.0, 1.0):
        bands, changes = [], []
        for seed in range(10):
            rng = np.random.default_rng(seed)
            anatomy = random_anatomy(rng, (40, 40, 40))
            appearance = random_appearance(rng, anatomy.num_labels, low_contrast_fraction=fraction)
            assert (appearance.window is not None) == (fraction == 1.0)
            bands.append(np.percentile(appearance.means, 80) - np.percentile(appearance.means, 20))
            (img_a, lab_a), (img_b, lab_b) = [render_view(rng, anatomy, appearance, (32, 32, 32)) for _ in range(2)]
            for value in range(1, anatomy.num_labels + 1):
                a, b = lab_a == value, lab_b == value
                if a.sum() > 200 and b.sum() > 200:
                    changes.append(abs(float(img_a[a].mean() - img_b[b].mean())))
        measured[fraction] = (float(np.median(bands)), float(np.median(changes)))
    assert measured[1.0][0] < 0.15 < 0.4 < measured[0.0][0], measured
    assert measured[1.0][1] < 0.02 and measured[0.0][1] > 0.03, measured
    with pytest.raises(ValueError, match="low_contrast_fraction should be in"):
        RandomEpisodeDataset(image_size=(16, 16, 16), low_contrast_fraction=-0.1)


def test_random_episode_is_a_function_of_the_generator_state():
    a = random_episode(np.random.default_rng(7), (16, 16, 16))
    b = random_episode(np.random.default_rng(7), (16, 16, 16))
    assert _equal(a, b)


def test_training_step_runs_and_leaves_the_memory_bank_alone():
    torch.manual_seed(0)
    net = iris_small()
    ds = RandomEpisodeDataset(image_size=(32, 32, 32), references_per_episode=2, episodes_per_epoch=2)
    losses = []
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(ds, batch_size=2),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=IgnoreChannelsLoss(DiceCELoss(sigmoid=True)),
        prepare_batch=prepare_episode_batch,
        train_handlers=[MemoryBankUpdater(["liver", "spleen"]), DatasetEpochHandler(ds)],
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[0]["loss"]))
    before = [p.detach().clone() for p in net.parameters()]
    trainer.run()
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert net.memory_bank.class_names == ["liver", "spleen"] and int(net.memory_bank.counts.sum()) == 0


@pytest.fixture(scope="module")
def episodes(tmp_path_factory) -> EpisodeDataset:
    datalist = generate_synthetic_3d(
        tmp_path_factory.mktemp("synth"), num_cases=4, shape=(24, 24, 16), classes=CLASSES,
        spacing_range=((1.5, 1.5),) * 3, split=(1.0, 0.0, 0.0), shape_jitter=0,
    )
    resize = Resized(KEYS, spatial_size=(16, 16, 16), mode=["trilinear", "nearest"])
    preprocessing = Compose([LoadImaged(KEYS), EnsureChannelFirstd(KEYS), resize])
    return EpisodeDataset(
        load_datalist(datalist), preprocessing, classes_per_episode=2, references_per_episode=1, episodes_per_epoch=8
    )


# [random_fraction, expected sources: random count out of 8 (None: some of each), references per item]
MIX_CASES = [[0.0, 0, 1], [1.0, 8, 3], [0.5, None, 3]]


@pytest.mark.parametrize("fraction, random_count, refs", MIX_CASES)
def test_mixture_sources_and_padding(episodes, fraction, random_count, refs):
    random = RandomEpisodeDataset(image_size=(16, 16, 16), classes_per_episode=2, references_per_episode=3)
    mixed = MixedEpisodeDataset(random, episodes, random_fraction=fraction, seed=1)
    assert len(mixed) == 8 and mixed.class_names == episodes.class_names == ["ball", "box", "egg"]
    sources = [mixed.is_random(i) for i in range(len(mixed))]
    if random_count is None:
        assert 0 < sum(sources) < len(mixed)
    else:
        assert sum(sources) == random_count
    torch.manual_seed(0)
    for index, is_random in enumerate(sources):
        item = mixed[index]
        assert item["ref_image"].shape == (refs, 1, 16, 16, 16) and item["ref_label"].shape == (refs, 2, 16, 16, 16)
        ids = item["class_ids"]
        assert bool((ids == -1).all()) if is_random else bool((ids[0] >= 0))
        if is_random:
            assert _equal(item, random.episode(index))
        else:  # a labelled episode keeps its one reference; the other slots are padding
            assert not bool(item["ref_label"][1:].any())
    mixed.set_epoch(1)
    assert random.epoch == 1


def test_mixture_feeds_the_memory_bank_from_labelled_episodes_only(episodes):
    random = RandomEpisodeDataset(image_size=(16, 16, 16), classes_per_episode=2, references_per_episode=2)
    mixed = MixedEpisodeDataset(random, episodes, random_fraction=0.5, episodes_per_epoch=4, seed=0)
    torch.manual_seed(0)
    net = iris_small()
    seen = []
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=1, train_data_loader=DataLoader(mixed, batch_size=2), network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=IgnoreChannelsLoss(DiceCELoss(sigmoid=True)), prepare_batch=prepare_episode_batch,
        train_handlers=[MemoryBankUpdater(mixed.class_names), DatasetEpochHandler(mixed)],
    )
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.extend(e.state.batch["class_ids"].tolist()))
    trainer.run()
    labelled = [i for ids in seen for i in ids if i >= 0]
    assert labelled and len(seen) == 4
    assert int(net.memory_bank.counts.sum()) == len(labelled)
    assert set(net.memory_bank.known_classes) == {mixed.class_names[i] for i in labelled}


def test_mixture_ill_arguments(episodes):
    with pytest.raises(ValueError, match="random_fraction"):
        MixedEpisodeDataset(RandomEpisodeDataset(classes_per_episode=2), episodes, random_fraction=1.5)
    with pytest.raises(ValueError, match="classes_per_episode"):
        MixedEpisodeDataset(RandomEpisodeDataset(classes_per_episode=3), episodes)
    wrong_size = MixedEpisodeDataset(
        RandomEpisodeDataset(image_size=(32, 32, 32), classes_per_episode=2), episodes, random_fraction=0.0
    )
    with pytest.raises(ValueError, match="spatial size"):
        wrong_size[0]
