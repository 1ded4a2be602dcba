"""One vocabulary for the bundles: the real collection passes, and each kind of breach is caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.bundle.vocabulary import RETIRED, VOCABULARY, check_vocabulary, config_ids

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"


def test_the_collection_speaks_one_vocabulary():
    assert check_vocabulary(BUNDLES_DIR) == []


def test_every_bundle_takes_its_inputs_as_images_and_names_its_classes_alike():
    for bundle in sorted(p for p in BUNDLES_DIR.iterdir() if (p / "configs" / "metadata.json").is_file()):
        ids = config_ids(bundle)
        if bundle.name != "cxr_report_labeler":  # it reads reports, not images
            assert "images" in ids["inference.json"], bundle.name
        assert not set(RETIRED) & {k for v in ids.values() for k in v}, bundle.name
        assert json.loads((bundle / "configs" / "metadata.json").read_text())["class_names"], bundle.name


def _bundle(root: Path, name: str, train: dict, readme: str = "", class_names=("a", "b")) -> Path:
    folder = root / name
    (folder / "configs").mkdir(parents=True)
    (folder / "docs").mkdir()
    (folder / "configs" / "metadata.json").write_text(json.dumps({"class_names": list(class_names)}))
    (folder / "configs" / "train.json").write_text(json.dumps(train))
    (folder / "docs" / "README.md").write_text(readme)
    return folder


def test_a_clean_pair_passes(tmp_path):
    _bundle(tmp_path, "one", {"image_size": [32, 32, 16], "class_names": ["a", "b"], "overwrite": False})
    _bundle(tmp_path, "two", {"image_size": 256, "overwrite": "$False",
                              "network_def": {"_target_": "torch.nn.Identity"}},
            "```bash\npython -m monai.bundle run --config_file x.json \\\n    --image_size 64 --overwrite true\n```\n")
    assert check_vocabulary(tmp_path) == []


@pytest.mark.parametrize(
    "one, two, readme, expected",
    [
        ({"stride": 2}, {"stride": 4}, "", "'stride' is used by one, two but has no meaning"),
        ({"queries": "x.json"}, {}, "", "'queries' is a retired name; use 'images'"),
        ({}, {}, "Pass `--datalists` to ...", "names 'datalists', retired for 'datalist'"),
        ({"image_size": "[64, 64]"}, {}, "", "'image_size' = '[64, 64]' does not fit its meaning"),
        ({"overwrite": "false"}, {}, "", "'overwrite' = 'false' does not fit"),
        ({"ct_window_center_width": [40, -400]}, {}, "", "'ct_window_center_width' = [40, -400] does not fit"),
        ({"class_names": ["b", "a"]}, {}, "", "'class_names' ['b', 'a'] differs from metadata.json's ['a', 'b']"),
        ({}, {}, "```\npython -m monai.bundle run --config_file t.json \\\n  --image_sizes 3\n```",
         "'--image_sizes' in a run command is no config id"),
        ({"steps": ["@train#transforms#3"]}, {}, "", "'@train#transforms#3' reaches into a list by position"),
        ({"train#handlers#0#interval": 2}, {}, "", "'train#handlers#0' reaches into a list by position"),
    ],
)
def test_each_breach_is_named(tmp_path, one, two, readme, expected):
    _bundle(tmp_path, "one", {**one, "image_size": one.get("image_size", [8, 8])}, readme)
    _bundle(tmp_path, "two", {**two, "image_size": [8, 8]})
    problems = check_vocabulary(tmp_path)
    assert len(problems) == 1 and expected in problems[0], problems


def test_metadata_without_class_names_is_named(tmp_path):
    _bundle(tmp_path, "one", {}, class_names=())
    assert check_vocabulary(tmp_path) == [
        "one/configs/metadata.json: 'class_names' should be a list of distinct names, got []."]


def test_every_term_has_a_meaning_and_retired_names_point_into_the_vocabulary():
    assert all(term.meaning for term in VOCABULARY.values())
    assert set(RETIRED.values()) <= set(VOCABULARY) and not set(RETIRED) & set(VOCABULARY)
