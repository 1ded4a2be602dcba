from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized

from common.data import EpisodeDataset, StructureClass, generate_synthetic_3d, load_datalist
from common.engines import prepare_episode_batch
from common.handlers import (
    CaseReportWriter,
    GradientClipping,
    MemoryBankUpdater,
    ResumableCheckpoint,
    latest_checkpoint,
)
from common.losses import IgnoreChannelsLoss
from common.networks import iris_small

KEYS = ["image", "label"]
# small structures, so that 24 x 24 x 16 volumes hold several classes each
CLASSES = [
    StructureClass("ball", "ellipsoid", 200.0, size_range_mm=(6.0, 10.0)),
    StructureClass("box", "cuboid", -200.0, size_range_mm=(6.0, 10.0)),
    StructureClass("egg", "ellipsoid", 500.0, size_range_mm=(6.0, 10.0)),
]

# [max_norm, scale of the network weights]
CLIP_CASES = [
    [1.0, 1e3],
    [0.05, 10.0],
    [1e-3, 1e4],
]


class _GradNormRecorder:
    """Records the total gradient norm when the backward pass completes (attach after the clipping handler)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        grads = [p.grad.flatten() for p in engine.network.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


def _regression_loader(num: int = 3) -> DataLoader:
    torch.manual_seed(0)
    data = [{"image": torch.randn(4), "label": torch.randn(1) * 100} for _ in range(num)]
    return DataLoader(data, batch_size=1)


def _linear(scale: float) -> torch.nn.Module:
    torch.manual_seed(1)
    net = torch.nn.Linear(4, 1)
    with torch.no_grad():
        net.weight.mul_(scale)
    return net


def _regression_trainer(net, handlers, max_epochs: int = 1, lr: float = 0.0) -> SupervisedTrainer:
    return SupervisedTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=_regression_loader(),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        loss_function=torch.nn.MSELoss(),
        train_handlers=handlers,
    )


@pytest.mark.parametrize("max_norm, scale", CLIP_CASES)
def test_gradient_clipping_bounds_the_norm(max_norm, scale):
    recorder = _GradNormRecorder()
    trainer = _regression_trainer(_linear(scale), [GradientClipping(max_norm), recorder])
    unclipped = []
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: unclipped.append(e.state.grad_norm))
    trainer.run()
    assert len(recorder.norms) == 3
    assert all(n <= max_norm + 1e-6 for n in recorder.norms)
    assert all(n == pytest.approx(max_norm, rel=1e-4) for n in recorder.norms)  # every gradient was too large
    assert all(u > max_norm for u in unclipped)  # state.grad_norm is the norm before clipping


def test_gradient_clipping_leaves_small_gradients():
    recorder, unclipped = _GradNormRecorder(), []
    trainer = _regression_trainer(_linear(1.0), [recorder])
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: unclipped.append(_total_norm(e)))
    trainer.run()
    max_norm = 2 * max(unclipped)
    recorder_clipped = _GradNormRecorder()
    _regression_trainer(_linear(1.0), [GradientClipping(max_norm), recorder_clipped]).run()
    assert recorder_clipped.norms == pytest.approx(recorder.norms, rel=1e-6)


def _total_norm(engine) -> float:
    return float(torch.cat([p.grad.flatten() for p in engine.network.parameters()]).norm())


@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_gradient_clipping_ill_arguments(max_norm):
    with pytest.raises(ValueError):
        GradientClipping(max_norm)


@pytest.fixture(scope="module")
def episodes(tmp_path_factory) -> EpisodeDataset:
    datalist = generate_synthetic_3d(
        tmp_path_factory.mktemp("synth"),
        num_cases=4,
        shape=(24, 24, 16),
        classes=CLASSES,
        spacing_range=((1.5, 1.5),) * 3,
        split=(1.0, 0.0, 0.0),
        shape_jitter=0,
    )
    preprocessing = Compose(
        [
            LoadImaged(KEYS),
            EnsureChannelFirstd(KEYS),
            Resized(KEYS, spatial_size=(16, 16, 16), mode=["trilinear", "nearest"]),
        ]
    )
    return EpisodeDataset(
        load_datalist(datalist), preprocessing, classes_per_episode=2, references_per_episode=1, episodes_per_epoch=2
    )


def _episode_run(episodes: EpisodeDataset) -> tuple[torch.nn.Module, list[list[int]]]:
    """Two training iterations with a memory bank updater; returns the network and each episode's class ids."""
    torch.manual_seed(0)
    net = iris_small()
    seen: list[list[int]] = []
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(episodes, batch_size=1),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=IgnoreChannelsLoss(DiceCELoss(sigmoid=True)),
        prepare_batch=prepare_episode_batch,
        train_handlers=[MemoryBankUpdater(episodes.class_names)],
    )
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.state.batch["class_ids"][0].tolist()))
    trainer.run()
    assert trainer.state.iteration == 2
    return net, seen


def test_memory_bank_updater_fills_the_bank(episodes):
    net, seen = _episode_run(episodes)
    bank = net.memory_bank
    assert bank.class_names == episodes.class_names  # registered in vocabulary order when the run starts
    updated = {episodes.class_names[i] for ids in seen for i in ids if i >= 0}
    assert updated and set(bank.known_classes) == updated
    for i, name in enumerate(bank.class_names):
        updates = sum(episodes.class_names.index(name) in ids for ids in seen)
        assert int(bank.counts[i]) == updates
        assert bool(bank.embeddings[i].abs().sum() > 0) == (updates > 0)
    assert torch.isfinite(bank.retrieve(sorted(updated))).all()


def test_memory_bank_updater_with_several_references(episodes):
    two_refs = EpisodeDataset(
        episodes.data, episodes.transform, classes_per_episode=2, references_per_episode=2, episodes_per_epoch=2
    )
    net, seen = _episode_run(two_refs)
    assert set(net.memory_bank.known_classes) == {two_refs.class_names[i] for ids in seen for i in ids if i >= 0}


def test_memory_bank_updater_ignores_eval_forward_and_padding():
    torch.manual_seed(0)
    net = iris_small()
    refs, masks = torch.rand(1, 1, 1, 16, 16, 16), (torch.rand(1, 1, 2, 16, 16, 16) > 0.5).float()

    def step(engine, batch):
        net.train(batch["train"])
        net.encode_task(refs, masks)

    engine = Engine(step)
    engine.network = net
    MemoryBankUpdater(["a", "b", "c"]).attach(engine)
    # an eval-mode forward is not an episode; a -1 channel is padding
    batches = [
        {"train": False, "class_ids": torch.tensor([[0, 1]])},
        {"train": True, "class_ids": torch.tensor([[2, -1]])},
    ]
    engine.run(batches)
    assert net.memory_bank.class_names == ["a", "b", "c"]
    assert net.memory_bank.known_classes == ["c"]
    assert net.memory_bank.counts.tolist()[:3] == [0, 0, 1]


def test_resumable_checkpoint_writes_and_resumes(tmp_path):
    net = _linear(3.0)
    trainer = _regression_trainer(net, [], max_epochs=2, lr=1e-3)
    ResumableCheckpoint(tmp_path, {"network": net}).attach(trainer)
    trainer.run()
    files = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert files == ["checkpoint_epoch=2.pt"]  # n_saved=1: only the latest
    assert latest_checkpoint(tmp_path) == str(tmp_path / files[0])
    saved = {k: v.clone() for k, v in net.state_dict().items()}

    fresh = _linear(0.5)
    resumed = _regression_trainer(fresh, [], max_epochs=3, lr=0.0)
    ResumableCheckpoint(tmp_path, {"network": fresh}, resume=True, save=False).attach(resumed)
    resumed.run()
    assert resumed.state.epoch == 3 and resumed.state.iteration == 9  # continues after epoch 2 of 3 iterations
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k  # lr 0: the loaded weights are kept
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == files  # save=False wrote nothing


def test_resume_from_an_empty_folder_raises(tmp_path):
    net = _linear(1.0)
    trainer = _regression_trainer(net, [])
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ResumableCheckpoint(tmp_path, {"network": net}, resume=True).attach(trainer)


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    names = ["checkpoint_epoch=2.pt", "checkpoint_epoch=1.pt", "stage2_checkpoint_epoch=3.pt", "model.pt"]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=1.pt")  # the newest, not the name
    assert latest_checkpoint(tmp_path, "stage2") == str(tmp_path / "stage2_checkpoint_epoch=3.pt")
    assert latest_checkpoint(tmp_path, "stage3") is None


def _report_engine(sources, failures, classes):
    engine = Engine(lambda e, b: None)

    @engine.on(Events.STARTED)
    def _fill(e):
        e.state.case_sources, e.state.case_failures, e.state.class_names = sources, failures, classes

    return engine


@pytest.mark.parametrize(
    "sources, failures",
    [
        [["/d/a.nii.gz", "/d/b.nii.gz"], []],
        [["/d/a.nii.gz"], [{"source": "/d/bad.nii.gz", "error": "/d/bad.nii.gz: OSError: truncated"}]],
    ],
)
def test_case_report_writer(tmp_path, caplog, sources, failures):
    engine = _report_engine(sources, failures, ["liver"])
    CaseReportWriter(tmp_path / "out", filename="report.json").attach(engine)
    with caplog.at_level(logging.INFO, logger="common.handlers.case_report"):
        engine.run([0])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == {"completed": sources, "skipped": [], "failed": failures, "classes": ["liver"]}
    if failures:
        assert "1 case(s) failed, 1 completed" in caplog.text and "truncated" in caplog.text
    else:
        assert "2 case(s) completed" in caplog.text


def test_case_report_writer_on_a_plain_engine(tmp_path):
    engine = Engine(lambda e, b: None)
    CaseReportWriter(tmp_path).attach(engine)
    engine.run([0])
    report = json.loads((tmp_path / "run_report.json").read_text())
    assert report == {"completed": [], "skipped": [], "failed": [], "classes": []}


def test_case_report_writer_keeps_earlier_reports(tmp_path):
    earlier = tmp_path / "run_report.json"
    earlier.write_text("earlier run")
    engine = Engine(lambda e, b: None)
    CaseReportWriter(tmp_path).attach(engine)
    engine.run([0])
    kept = [p for p in tmp_path.glob("run_report_*.json")]
    assert len(kept) == 1 and kept[0].read_text() == "earlier run"
    assert json.loads(earlier.read_text())["completed"] == []


def test_case_report_writer_reports_a_run_that_stops(tmp_path):
    """When every case fails the run raises, and the report still names each failure."""
    failure = {"source": "/d/a.nii.gz", "error": "/d/a.nii.gz: outputs already exist"}

    def step(engine, batch):
        engine.state.case_failures = [failure]
        raise RuntimeError("all 1 case(s) failed")

    engine = Engine(step)
    CaseReportWriter(tmp_path).attach(engine)
    with pytest.raises(RuntimeError, match="all 1 case"):
        engine.run([0])
    assert json.loads((tmp_path / "run_report.json").read_text())["failed"] == [failure]


def test_case_report_writer_refuses_an_unwritable_folder_before_any_case(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a folder below a file can never be made, whoever runs the test
    steps = []
    engine = Engine(lambda e, b: steps.append(b))
    CaseReportWriter(blocker / "out").attach(engine)
    with pytest.raises(PermissionError, match=f"output folder {blocker / 'out'} is not writable"):
        engine.run([0, 1])
    assert steps == []
