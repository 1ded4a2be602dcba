from __future__ import annotations

import pytest

from common.data.report_text import region_texts, report_text_batch, split_sentences


def test_split_sentences_and_region_texts():
    assert split_sentences(" A 3.5 mm nodule. No effusion!  Liver normal? ") == [
        "A 3.5 mm nodule.", "No effusion!", "Liver normal?"]
    report = {"findings": [{"text": "A.", "region_id": 1}, {"text": "B.", "region_id": 0},
                           {"text": "C.", "region_id": 1}, {"text": "D.", "region_id": 4}]}
    assert region_texts(report) == {1: "A. C.", 4: "D."}


def test_report_text_batch():
    reports = [
        {"impression": "One.", "findings": [{"text": "A.", "region_id": 2}, {"text": "B.", "region_id": 0}],
         "cot": [{"step": "s1", "mask_region": 2}, {"step": "s2", "mask_region": 0}]},
        {"impression": "Two.", "findings": [{"text": "C.", "region_id": 1}, {"text": "D.", "region_id": 3},
                                            {"text": "E.", "region_id": 1}]},
    ]
    batch = report_text_batch(reports, num_regions=3)
    assert batch["impressions"] == ["One.", "Two."]
    assert batch["region_texts"] == ["A.", "C. E.", "D."]
    assert batch["region_batch"].tolist() == [0, 1, 1] and batch["region_ids"].tolist() == [2, 1, 3]
    assert batch["region_mentioned"].tolist() == [[False, True, False], [True, False, True]]
    assert batch["step_texts"] == ["s1", "s2"]
    assert batch["step_batch"].tolist() == [0, 0] and batch["step_region"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="region ids should be in"):
        report_text_batch(reports, num_regions=2)
