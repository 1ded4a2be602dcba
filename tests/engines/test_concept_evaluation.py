"""CSR's evaluation: macro-F1 at thresholds chosen on validation images, beside the all-positive baseline."""

from __future__ import annotations

import json

import pytest
import torch

from common.engines import evaluate_concept_model


class _ScoreByBrightness(torch.nn.Module):
    """Disease 0's logit is 4 * (mean - 0.33): at 0.5 it misses the positive images (mean > 0) with mean < 0.33;
    disease 1's logit is 0 (probability 0.5 for every image)."""

    def explain(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        m = image.mean((1, 2, 3))
        logits = torch.stack([4 * (m - 0.33), torch.zeros_like(m)], 1)
        return {"logits": logits, "concept_logits": logits[:, :1], "similarity_scores": logits[:, :1]}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.explain(image)["logits"]


def _loader(values: torch.Tensor, second: torch.Tensor) -> list[dict]:
    images = values[:, None, None, None].expand(-1, 1, 4, 4).clone()
    diseases = torch.stack([(values > 0).float(), second.float()], 1)
    return [{"image": images[i:i + 4], "diseases": diseases[i:i + 4], "concepts": diseases[i:i + 4, :1]}
            for i in range(0, len(values), 4)]


# validation means step by 0.1 from -0.95: its best thresholds lie between the probabilities at -0.05 and 0.05;
# the test means are those and the ones in between but 0, so no test image falls inside that gap
VAL = torch.linspace(-0.95, 0.95, 20)
TEST = torch.cat([VAL, torch.linspace(-0.9, -0.1, 9), torch.linspace(0.1, 0.9, 9)])
SECOND = torch.arange(len(TEST)) % 4 == 0  # disease 1 positives: 10 of 38


@pytest.fixture
def loaders():
    return _loader(TEST, SECOND), _loader(VAL, torch.arange(len(VAL)) % 2 == 0)


def test_validation_thresholds_recover_the_boundary(loaders, tmp_path):
    test, val = loaders
    r = evaluate_concept_model(_ScoreByBrightness(), test, ["c"], ["d0", "d1"], tmp_path, threshold_loader=val)
    assert r["thresholds_from"] == "validation"
    assert r["per_disease"]["d0"]["f1"] == pytest.approx(1.0)
    assert r["per_disease"]["d0"]["threshold"] < 0.5
    p = 10 / 38  # all-positive F1 = 2p / (1 + p); disease 1's constant 0.5 is all-positive at any threshold <= 0.5
    assert r["per_disease"]["d1"]["f1_all_positive"] == pytest.approx(2 * p / (1 + p))
    assert r["per_disease"]["d1"]["f1"] == pytest.approx(2 * p / (1 + p))
    assert r["disease_macro_f1"] > r["disease_macro_f1_all_positive"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["disease_macro_f1"] == pytest.approx(r["disease_macro_f1"])
    assert "F1 all positive" in (tmp_path / "metrics.md").read_text()


def test_without_validation_the_threshold_is_one_half(loaders, tmp_path):
    test, _ = loaders
    r = evaluate_concept_model(_ScoreByBrightness(), test, ["c"], ["d0", "d1"], tmp_path)
    assert r["thresholds_from"] == "0.5"
    # positives with mean in (0, 0.33) fall below 0.5: 13 of 19 found at precision 1 -> F1 = 2 * 13 / (13 + 19)
    assert int((TEST > 0.33).sum()) == 13 and int((TEST > 0).sum()) == 19
    assert r["per_disease"]["d0"]["f1"] == pytest.approx(26 / 32, abs=1e-6)
    empty = evaluate_concept_model(_ScoreByBrightness(), test, ["c"], ["d0", "d1"], tmp_path, threshold_loader=[])
    assert empty["thresholds_from"] == "0.5" and empty["disease_macro_f1"] == pytest.approx(r["disease_macro_f1"])
