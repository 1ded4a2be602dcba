from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from torch.utils.data import DataLoader

from common.data import collate_reports, generate_ct_report_case
from common.engines import (
    CasesFailedError,
    ContrastiveTrainer,
    EncodingInferer,
    ImageTextModel,
    PrepareVolumeBatch,
    RetrievalEvaluator,
    TrainableState,
)
from common.losses import MultiLevelContrastiveLoss
from common.metrics import RetrievalMetric
from common.networks import TextEncoder, ct_vit_tiny

SHAPE = (16, 64, 64)


def _cases(num: int) -> list[dict]:
    out = []
    for seed in range(num):
        image, mask, report, _, _ = generate_ct_report_case(np.random.default_rng(seed), SHAPE)
        volume = torch.from_numpy(np.clip((image.transpose(2, 1, 0) + 1000.0) / 2000.0, 0, 1))[None].float()
        out.append({"image": volume, "mask": torch.from_numpy(mask.transpose(2, 1, 0).astype(np.int64))[None],
                    "report": report})
    return out


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return _cases(3)


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(out_dim=64, freeze="all")


def _model(text_encoder, cache_text=True) -> ImageTextModel:
    torch.manual_seed(0)
    return ImageTextModel(ct_vit_tiny(), text_encoder, MultiLevelContrastiveLoss(), cache_text=cache_text)


def test_three_levels_cached_text_equals_uncached(cases, text_encoder):
    batch = collate_reports(cases)
    cached, plain = _model(text_encoder), _model(text_encoder, cache_text=False)
    assert cached.cache_text and not plain.cache_text
    levels = cached(batch["image"], batch["mask"], batch["report"])
    assert set(levels) == {"global", "region", "step", "total"} and bool(torch.isfinite(levels["total"]))
    torch.testing.assert_close(levels["total"], plain(batch["image"], batch["mask"], batch["report"])["total"])
    texts = [batch["report"][0]["impression"], "A new sentence."]
    torch.testing.assert_close(cached.embed_texts(texts), plain.embed_texts(texts), atol=1e-5, rtol=1e-5)
    levels["total"].backward()
    assert cached.text_encoder.projection.weight.grad is not None
    assert cached.image_encoder.region_head.weight.grad.abs().sum() > 0  # region and step levels reach it
    assert all(p.grad is None for p in cached.text_encoder.backbone.parameters())
    assert len(cached.trainable_parameters()) == len([p for p in cached.parameters() if p.requires_grad])


def test_auxiliary_segmentation_level_learns_the_region_map(cases, text_encoder):
    from monai.losses import DiceCELoss

    with pytest.raises(ValueError, match="seg_head=True"):
        ImageTextModel(ct_vit_tiny(), text_encoder, MultiLevelContrastiveLoss(), seg_loss=DiceCELoss(), seg_weight=1)
    torch.manual_seed(0)
    model = ImageTextModel(ct_vit_tiny(seg_head=True), text_encoder, MultiLevelContrastiveLoss(),
                           seg_loss=DiceCELoss(to_onehot_y=True, softmax=True), seg_weight=0.5)
    batch = collate_reports(cases)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    seg = []
    for _ in range(15):
        levels = model(batch["image"], batch["mask"], batch["report"])
        others = sum(v for k, v in levels.items() if k not in ("seg", "total"))
        torch.testing.assert_close(levels["total"], others + 0.5 * levels["seg"])
        optimizer.zero_grad()
        levels["total"].backward()
        optimizer.step()
        seg.append(float(levels["seg"]))
    assert seg[-1] < 0.7 * seg[0], seg
    assert "seg" not in model(batch["image"], None, batch["report"])  # no mask, no segmentation target


def test_trainable_state_holds_the_projection_only(text_encoder):
    state = TrainableState(text_encoder)
    assert list(state.state_dict()) == ["projection.weight"]
    other = TrainableState(TextEncoder(out_dim=64, freeze="all"))
    other.load_state_dict(state.state_dict())
    torch.testing.assert_close(other.module.projection.weight, text_encoder.projection.weight)
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"something.else": torch.zeros(1)})


def test_trainer_steps_reduce_the_loss(cases, text_encoder):
    model = _model(text_encoder)
    loader = DataLoader(cases, batch_size=3, collate_fn=collate_reports)
    trainer = ContrastiveTrainer("cpu", max_epochs=8, train_data_loader=loader, network=model,
                                 optimizer=torch.optim.AdamW(model.trainable_parameters(), lr=3e-3), amp=True)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    trainer.run()
    assert not trainer.amp  # AMP is for CUDA only
    assert {"loss_global", "loss_region", "loss_step"} <= set(trainer.state.output[0])  # decollated per case
    assert losses[-1] < losses[0]


def test_inferer_and_evaluator_shapes(cases, text_encoder):
    model = _model(text_encoder)
    batch = collate_reports(cases[:2])
    image, _, args, kwargs = PrepareVolumeBatch()(batch, device="cpu")
    out = EncodingInferer()(image, model.image_encoder, *args, **kwargs)
    assert out["global"].shape == (2, 64) and out["region"].shape == (2, 8, 64) and out["region_present"].all()
    loader = DataLoader(cases + [{"error": "bad.nii.gz: broken", "source": "bad.nii.gz"}], batch_size=1,
                        collate_fn=collate_reports)
    evaluator = RetrievalEvaluator("cpu", loader, model.image_encoder, text_encoder=model,
                                   key_val_metric={"r5": RetrievalMetric("text_to_image_R@5")},
                                   additional_metrics={"all": RetrievalMetric(None)})
    with pytest.raises(CasesFailedError, match="1 case\\(s\\) failed, 3 completed"):  # after scoring the others
        evaluator.run()
    assert evaluator.state.metrics["cases"] == 3 and evaluator.state.metrics["region_pairs"] >= 3
    assert [f["source"] for f in evaluator.state.case_failures] == ["bad.nii.gz"]


def test_evaluator_recall_matches_the_ranks_of_its_cases(text_encoder):
    # 8 cases, 8 different impressions: an untrained model's Recall@1 and Recall@5 are below 1, so they check that
    # the evaluator pairs each case's volume with its own report across batches and counts ranks as they are
    cases, model = _cases(8), _model(text_encoder)
    with torch.no_grad():
        image = torch.cat([model.image_encoder.encode(c["image"][None], c["mask"][None])["global"] for c in cases])
        text = model.embed_texts([c["report"]["impression"] for c in cases])
    sim = F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T  # (text, volume)
    rank = (sim > sim.diagonal()[:, None]).sum(1)  # volumes scoring above each text's own
    expected = {k: float((rank < k).float().mean()) for k in (1, 5)}
    assert expected[1] < expected[5] < 1.0, rank
    loader = DataLoader(cases, batch_size=1, collate_fn=collate_reports)
    evaluator = RetrievalEvaluator("cpu", loader, model.image_encoder, text_encoder=model,
                                   key_val_metric={"r5": RetrievalMetric("text_to_image_R@5")},
                                   additional_metrics={"all": RetrievalMetric(None)})
    evaluator.run()
    metrics = evaluator.state.metrics
    assert metrics["r5"] == pytest.approx(expected[5]) and metrics["text_to_image_R@1"] == pytest.approx(expected[1])
    assert metrics["chance_R@5"] == pytest.approx(5 / 8) and metrics["cases"] == 8
