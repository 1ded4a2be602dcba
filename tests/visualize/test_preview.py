from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from monai.data import MetaTensor
from PIL import Image

from common.visualize.preview import (
    MASK_COLOUR,
    _box_rectangle,
    _centre_indices,
    _episode_panels,
    _orthogonal_figure,
    _orthogonal_slices,
    _overlay_figure,
    _spacing,
    save_episode_sheet,
    save_orthogonal_preview,
    save_overlay_2d,
)

SHAPE = (24, 20, 12)  # (x, y, z)

# [kwargs for _centre_indices, expected centre]
CENTRE_CASES = [
    [{"label": None, "shape": (5, 6, 7)}, (2, 3, 3)],
    [{"label": np.zeros((4, 5, 6))}, (2, 2, 3)],
]

ILL_CASES = [
    [save_orthogonal_preview, {"image": np.zeros((4, 4))}, "image should have 3 spatial dims"],
    [save_orthogonal_preview, {"image": np.zeros((4, 4, 4)), "label": np.zeros((4, 4, 3))}, "label should have shape"],
    [save_orthogonal_preview, {"image": np.zeros((4, 4, 4)), "spacing": (1, 0, 1)}, "spacing should be"],
    [save_overlay_2d, {"image": np.zeros((8, 8)), "boxes": np.zeros((2, 5))}, "boxes should have shape"],
    [save_overlay_2d, {"image": np.zeros((8, 8)), "boxes": [[0, 0, 2, 2]], "labels": ["a", "b"]}, "labels should"],
    [save_overlay_2d, {"image": np.zeros((8, 8)), "mask": np.zeros((8, 4))}, "mask should have shape"],
]


def _volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 1.0, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, dtype=np.int64)
    label[4:11, 6:13, 2:6] = 1  # with label 2: x 4..10, y 6..12, z 2..8, centre (7, 9, 5)
    label[4:11, 6:13, 6:9] = 2
    return image, label


def _png(path) -> np.ndarray:
    with Image.open(path) as png:
        assert png.format == "PNG"
        return np.asarray(png.convert("RGB")).astype(np.int16)


def _pixel(fig, ax, xy) -> tuple[int, int]:
    """Row and column of the PNG pixel showing data point ``xy`` of ``ax``."""
    fig.canvas.draw()  # resolve the constrained layout
    x, y = ax.transData.transform(xy)
    return int(fig.bbox.height - y), int(x)


def _axes_window(fig, ax) -> tuple[slice, slice]:
    fig.canvas.draw()
    x0, y0, x1, y1 = ax.bbox.extents
    height = fig.bbox.height
    return slice(int(np.ceil(height - y1)), int(height - y0)), slice(int(np.ceil(x0)), int(x1))


def _coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not grey: only overlays are coloured, the images and text are greyscale."""
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > 12


@pytest.mark.parametrize("kwargs, expected", CENTRE_CASES)
def test_centre_indices_default_to_the_middle(kwargs, expected):
    assert _centre_indices(**kwargs) == expected


def test_centre_indices_by_hand():
    label = np.zeros((6, 6, 8), dtype=np.uint8)
    label[1, 2, 3] = 1
    label[3, 2, 5] = 4  # any value > 0 counts once
    assert _centre_indices(label) == (2, 2, 4)
    label[5, 5, 7] = 1  # (1+3+5)/3, (2+2+5)/3, (3+5+7)/3
    assert _centre_indices(label) == (3, 3, 5)


def test_orthogonal_slices_convention():
    volume = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    planes = _orthogonal_slices(volume, (3, 5, 7))
    assert planes["axial"].shape == (20, 24) and planes["coronal"].shape == (12, 24)
    assert planes["sagittal"].shape == (12, 20)
    # top-left shows the largest x (patient right in RAS) and the largest y (anterior) or z (superior)
    assert planes["axial"][0, 0] == volume[23, 19, 7]
    assert planes["coronal"][0, 0] == volume[23, 5, 11]
    assert planes["sagittal"][0, 0] == volume[3, 19, 11] and planes["sagittal"][-1, -1] == volume[3, 0, 0]


def test_orthogonal_preview_png(tmp_path):
    image, label = _volume()
    path = save_orthogonal_preview(torch.from_numpy(image)[None], tmp_path / "sub" / "preview.png", title="t")
    rgb = _png(path)
    assert rgb.shape == (420, 1050, 3)
    assert not _coloured(rgb).any()  # greyscale image and black text only


def test_label_overlay_colours_the_label_only(tmp_path):
    image, label = _volume()
    plain = _png(save_orthogonal_preview(image, tmp_path / "plain.png"))
    path = save_orthogonal_preview(image, tmp_path / "label.png", label=label, class_names={1: "liver", 2: "cyst"})
    labelled = _png(path)
    assert plain.shape == labelled.shape and (plain != labelled).any()
    # the same figure, to find where the axial panel and its label lie in the PNG
    fig = _orthogonal_figure(image, label, {1: "liver", 2: "cyst"}, (1.0, 1.0, 1.0), None)
    axial = fig.axes[0]
    assert axial.get_title() == "axial (z=5)"  # through the centre (7, 9, 5)
    rows, cols = _axes_window(fig, axial)
    coloured = _coloured(labelled[rows, cols])
    assert coloured.any()
    # the label occupies x 4..10, y 6..12; displayed flipped: column = 23 - x, row = 19 - y (pixel edges +-0.5)
    top, left = _pixel(fig, axial, (23 - 10 - 0.5, 19 - 12 - 0.5))
    bottom, right = _pixel(fig, axial, (23 - 4 + 0.5, 19 - 6 + 0.5))
    inside = np.zeros_like(coloured)
    inside[top - rows.start - 1:bottom - rows.start + 2, left - cols.start - 1:right - cols.start + 2] = True
    assert not (coloured & ~inside).any()
    centre = _pixel(fig, axial, (23 - 7, 19 - 9))
    np.testing.assert_array_less(labelled[centre][0], labelled[centre][2])  # tab10 blue over grey


def test_spacing_sets_aspect_and_comes_from_metatensor():
    image, label = _volume()
    fig = _orthogonal_figure(image, label, None, (1.0, 2.0, 3.0), None)
    assert [ax.get_aspect() for ax in fig.axes[:3]] == [2.0, 3.0, 1.5]
    meta = MetaTensor(torch.zeros(1, *SHAPE), affine=torch.diag(torch.tensor([0.5, 0.75, 2.5, 1.0])))
    assert _spacing(meta, None) == (0.5, 0.75, 2.5)
    assert _spacing(np.zeros(SHAPE), None) == (1.0, 1.0, 1.0)
    assert _spacing(meta, (1, 2, 3)) == (1.0, 2.0, 3.0)


def test_existing_file_is_never_overwritten(tmp_path):
    image, _ = _volume()
    path = tmp_path / "preview.png"
    path.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match=re.escape(str(path))):
        save_orthogonal_preview(image, path)
    with pytest.raises(FileExistsError, match=re.escape(str(path))):
        save_overlay_2d(image[:, :, 0], path)
    assert path.read_bytes() == b"user data"
    save_overlay_2d(image[:, :, 0], path, overwrite=True)
    first = path.read_bytes()
    save_overlay_2d(image[:, :, 0], path, overwrite=True)
    assert path.read_bytes() == first  # deterministic


def test_box_rectangle():
    assert _box_rectangle([10, 20, 50, 80]) == ((10.0, 20.0), 40.0, 60.0)


def test_boxes_drawn_in_place(tmp_path):
    image = np.zeros((100, 120), dtype=np.float32)
    box = [20, 30, 60, 80]  # x1, y1, x2, y2
    path = save_overlay_2d(image, tmp_path / "boxes.png", boxes=np.array([box]), labels=["nodule"], scores=[0.9])
    rgb = _png(path)
    fig = _overlay_figure(image, {}, np.array([box], dtype=float), ["nodule"], [0.9], None, None)
    ax = fig.axes[0]
    colour = np.array(colormaps["tab10"](0)[:3]) * 255
    for edge in [(20, 55), (60, 55), (40, 80)]:  # left, right, bottom edges
        np.testing.assert_allclose(rgb[_pixel(fig, ax, edge)], colour, atol=40)
    for point in [(40, 55), (10, 55), (90, 55), (40, 90)]:  # inside, left of, right of, below the box
        np.testing.assert_array_equal(rgb[_pixel(fig, ax, point)], [0, 0, 0])


def test_heatmap_panels_and_mask(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(64, 64))
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:48, 16:48] = True
    heatmaps = {"effusion": torch.rand(1, 8, 8), "nodule": rng.random((16, 16))}
    path = save_overlay_2d(image, tmp_path / "cams.png", heatmaps=heatmaps, mask=mask, title="case 1")
    rgb = _png(path)
    assert rgb.shape[1] == 3 * 400 and 400 <= rgb.shape[0] <= 500
    fig = _overlay_figure(image.astype(np.float32), {"effusion": np.zeros((8, 8)), "nodule": np.zeros((8, 8))},
                          None, None, None, "case 1", mask)
    assert [ax.get_title() for ax in fig.axes[1:3]] == ["effusion", "nodule"]
    cyan = np.array([int(MASK_COLOUR[i:i + 2], 16) for i in (1, 3, 5)])
    np.testing.assert_allclose(rgb[_pixel(fig, fig.axes[0], (16, 32))], cyan, atol=60)  # on the mask's left edge
    plain = _png(save_overlay_2d(image, tmp_path / "plain.png"))
    assert plain.shape == (rgb.shape[0], 400, 3) and not _coloured(plain).any()


@pytest.mark.parametrize("function, kwargs, message", ILL_CASES)
def test_ill_cases(tmp_path, function, kwargs, message):
    with pytest.raises(ValueError, match=message):
        function(path=tmp_path / "out.png", **kwargs)
    assert not (tmp_path / "out.png").exists()


def test_png_suffix_required(tmp_path):
    with pytest.raises(ValueError, match="should end with .png"):
        save_overlay_2d(np.zeros((8, 8)), tmp_path / "out.jpg")


def _episode(refs: int, slots: int, classes: int, channels: int) -> dict[str, torch.Tensor]:
    size = (12, 10, 8)
    label = torch.full((channels, *size), -1.0)
    ref_label = torch.zeros(slots, channels, *size)
    for k in range(classes):
        label[k] = 0.0
        label[k, 2 + k: 5 + k, 3:6, 2:6] = 1.0
        ref_label[:refs, k, 1 + k: 4 + k, 3:6, 2:6] = 1.0
    return {"image": torch.rand(1, *size), "label": label, "ref_image": torch.rand(slots, 1, *size),
            "ref_label": ref_label, "class_ids": torch.full((channels,), -1)}


def test_episode_sheet_draws_used_references_and_classes(tmp_path):
    episodes = [_episode(refs=1, slots=3, classes=2, channels=3), _episode(refs=3, slots=3, classes=1, channels=3)]
    panels = [_episode_panels(e) for e in episodes]
    assert [[name for name, _, _ in p] for p in panels] == [
        ["reference 1", "query"], ["reference 1", "reference 2", "reference 3", "query"]]  # padding slots left out
    assert [p[-1][2].shape for p in panels] == [(2, 12, 10, 8), (1, 12, 10, 8)]  # unused channels left out
    path = save_episode_sheet(episodes, tmp_path / "episodes.png", titles=["a", "b"])
    assert _png(path).shape[:2] == (450, 800)  # 2 rows x 4 panels of 200 pixels, plus the legend
    with pytest.raises(FileExistsError):
        save_episode_sheet(episodes, path)
    with pytest.raises(ValueError, match="titles"):
        save_episode_sheet(episodes, tmp_path / "other.png", titles=["a"])
    with pytest.raises(ValueError, match="at least one"):
        save_episode_sheet([], tmp_path / "none.png")


def test_report_preview_marks_entities_and_refuses_mismatched_findings(tmp_path):
    from common.visualize.preview import _marked_text, save_report_preview

    text = "No pleural effusion. The heart is enlarged."
    entities = [{"start": 3, "end": 19, "type": "FINDING", "negated": True},
                {"start": 25, "end": 30, "type": "ANATOMY", "negated": False},
                {"start": 34, "end": 42, "type": "FINDING", "negated": False}]
    assert _marked_text(text, entities) == "No [no: pleural effusion]. The <heart> is [enlarged]."
    path = save_report_preview(text, tmp_path / "r.png", ["a", "b"], [0.9, 0.1], [0.5, 0.5], entities, title="r")
    assert path.stat().st_size > 5000
    with pytest.raises(FileExistsError):
        save_report_preview(text, path, ["a", "b"], [0.9, 0.1], [0.5, 0.5])
    with pytest.raises(ValueError, match="one entry per finding"):
        save_report_preview(text, tmp_path / "s.png", ["a"], [0.9, 0.1], [0.5, 0.5])
