from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from common.data import collate_reports
from common.transforms import ValidateImaged, ValidateRegionMaskd, ValidateReportd

REPORT = {"findings": [{"text": "A 12 mm nodule in the right lung.", "region": "right_lung", "region_id": 1}],
          "impression": "Right lung nodule (12 mm).", "cot": [{"step": "Locate the right lung.", "mask_region": 1}]}

# report changes, expected message
ILL_REPORTS = [
    [{"impression": "  "}, "empty impression"],
    [{"findings": [{"text": "x", "region_id": 9}]}, "region id 9, outside 0..8"],
    [{"cot": [{"step": "Look.", "mask_region": 12}]}, "region id 12, outside 0..8"],
    [{"cot": [{"step": "", "mask_region": 1}]}, "empty reasoning step 0"],
]


def _image(name="case_7.nii.gz", shape=(1, 8, 16, 16)):
    return MetaTensor(torch.zeros(shape), meta={"filename_or_obj": name})


def test_valid_report_passes():
    assert ValidateReportd("report", num_regions=8)({"image": _image(), "report": REPORT})["report"] is REPORT


@pytest.mark.parametrize("change, message", ILL_REPORTS)
def test_bad_reports_name_the_case(change, message):
    with pytest.raises(ValueError, match=message) as err:
        ValidateReportd("report", num_regions=8)({"image": _image(), "report": {**REPORT, **change}})
    assert "case_7.nii.gz" in str(err.value)


def test_region_ids_above_the_configured_number_are_refused():
    mask = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "mask_3.nii.gz"})
    mask[0, 0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"mask_3.nii.gz: mask has region ids in \[0, 9\], above .* 8"):
        ValidateRegionMaskd("mask", num_regions=8)({"mask": mask})
    mask[0, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match="non-integral"):
        ValidateRegionMaskd("mask", num_regions=8)({"mask": mask})
    assert "mask" not in ValidateRegionMaskd("mask", num_regions=8)({"image": mask})  # a case without a mask


def test_minimum_size_per_axis():
    check = ValidateImaged("image", min_size=(4, 8, 8), reject_constant=False)  # blank images of each size
    check({"image": _image(shape=(1, 4, 8, 8))})
    with pytest.raises(ValueError, match=r"too small.*needs at least \[4, 8, 8\]"):
        check({"image": _image(shape=(1, 4, 8, 6))})


def test_collate_keeps_reports_and_drops_failed_cases():
    good = {"image": torch.zeros(1, 2, 2), "report": REPORT}
    batch = collate_reports([good, {"error": "x.nii.gz: broken", "source": "x.nii.gz"}, good])
    assert batch["image"].shape == (2, 1, 2, 2) and batch["report"] == [REPORT, REPORT]
    only_failures = collate_reports([{"error": "x.nii.gz: broken", "source": "x.nii.gz"}])
    assert only_failures["error"] == ["x.nii.gz: broken"] and "image" not in only_failures
