"""The converters' shared CSV reader and split."""

from __future__ import annotations

import gzip

import pytest

from common.data.tables import assign_splits, check_split, match_columns, read_csv


def test_read_csv_plain_and_gzipped_with_start_lines(tmp_path):
    text = '\ufeffid , note\na,"one"\nb,"two\nlines"\n c , three \n'
    plain, packed = tmp_path / "t.csv", tmp_path / "t.csv.gz"
    plain.write_text(text, encoding="utf-8")
    packed.write_bytes(gzip.compress(text.encode("utf-8")))
    for path in (plain, packed):
        header, rows = read_csv(path)
        assert header == ["id", "note"]  # BOM and spaces gone
        assert rows == [(2, {"id": "a", "note": "one"}), (3, {"id": "b", "note": "two\nlines"}),
                        (5, {"id": "c", "note": "three"})]  # "c" starts on line 5: the quoted cell took two


def test_read_csv_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_csv(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: empty CSV file"):
        read_csv(tmp_path / "empty.csv")


def test_match_columns_case_and_aliases():
    assert match_columns(["Image_ID", "rad_ID"], ["image_id", "RAD_id"], "f.csv") == {
        "image_id": "Image_ID", "RAD_id": "rad_ID"}
    assert match_columns(["other disease"], ["Other diseases"], "f.csv", {"other disease": "Other diseases"}) == {
        "Other diseases": "other disease"}
    with pytest.raises(ValueError, match=r"f.csv: missing columns \['x'\]; found \['a'\]"):
        match_columns(["a"], ["x"], "f.csv")


@pytest.mark.parametrize("args", [(-0.1, 0), (1.5, 0), (0.5, -1), (0.5, True), (0.6, 0, 0.6), (True, 0)])
def test_check_split_refuses(args):
    with pytest.raises(ValueError):
        check_split(*args)


def test_assign_splits_keeps_groups_whole_and_counts_as_asked():
    groups = [f"p{i // 3}" for i in range(30)]  # 10 groups of 3 items
    by_items = assign_splits(groups, val_fraction=0.2, test_fraction=0.1, seed=3)
    by_groups = assign_splits(groups, val_fraction=0.2, seed=3, count="groups")
    for splits in (by_items, by_groups):
        assert all(len({s for g, s in zip(groups, splits) if g == p}) == 1 for p in set(groups))
    assert by_items.count("test") == 3 and by_items.count("validation") == 6  # items: round(30 * f)
    assert by_groups.count("validation") == 6  # groups: round(10 * 0.2) = 2 groups of 3
    # seeded, and independent of row order
    assert assign_splits(groups, 0.2, 0.1, seed=3) == by_items
    shuffled = groups[::-1]
    assert assign_splits(shuffled, 0.2, 0.1, seed=3) == by_items[::-1]
    assert assign_splits(groups, 0.2, 0.1, seed=4) != by_items
    with pytest.raises(ValueError, match="count"):
        assign_splits(groups, 0.2, count="patients")
