"""The one preview writer of the project: small, deterministic PNGs of volumes and 2D images with their overlays.

Everything is drawn on a private ``matplotlib.figure.Figure`` with the Agg canvas, so no pyplot state is touched
and no display is needed; text uses matplotlib's bundled DejaVu font.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

__all__ = ["save_episode_sheet", "save_orthogonal_preview", "save_overlay_2d", "save_report_preview"]

DPI = 100
LABEL_ALPHA = 0.45
HEATMAP_ALPHA = 0.5
MASK_COLOUR = "#00e5ff"
# percentiles subsample big volumes with a fixed stride: same window every run, a fraction of the time
_PERCENTILE_VOXELS = 2**22


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _spatial(x: Any, ndim: int, name: str) -> np.ndarray:
    """``x`` as a numpy array of ``ndim`` spatial dims, a leading singleton channel dropped."""
    arr = _to_numpy(x)
    if arr.ndim == ndim + 1 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != ndim:
        raise ValueError(f"{name} should have {ndim} spatial dims (optionally a leading channel of 1), "
                         f"got shape {tuple(arr.shape)}.")
    return arr


def _target(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path should end with .png, got {path}.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(fig: Figure, path: Path) -> Path:
    # no Software/version metadata, so the same inputs give the same bytes
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _window(image: np.ndarray) -> tuple[float, float]:
    """1st and 99th percentile of the finite values (a unit window when the image is flat)."""
    values = image.ravel()
    if values.size > _PERCENTILE_VOXELS:
        values = values[:: values.size // _PERCENTILE_VOXELS + 1]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _label_colour(value: int) -> tuple[float, float, float, float]:
    # keyed by value, not rank, so one class keeps its colour across previews
    return colormaps["tab10"]((int(value) - 1) % 10)


def _class_name(value: int, class_names: Sequence[str] | Mapping[int, str] | None) -> str:
    if isinstance(class_names, Mapping):
        return str(class_names.get(value, f"label {value}"))
    if class_names is not None and 0 <= value < len(class_names):
        return str(class_names[value])
    return f"label {value}"


def _label_rgba(label: np.ndarray) -> np.ndarray:
    """RGBA overlay: transparent background, one colour per label value."""
    rgba = np.zeros((*label.shape, 4), dtype=np.float32)
    for value in np.unique(label[label > 0]):
        rgba[label == value] = (*_label_colour(value)[:3], LABEL_ALPHA)
    return rgba


def _centre_indices(label: np.ndarray | None, shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """Rounded centre of mass of ``label > 0``; the middle of ``shape`` (or of the label) with no foreground.

    Works from per-axis marginals, so memory stays at one boolean copy of the label.
    """
    if label is None:
        if shape is None:
            raise ValueError("shape should be given when label is None.")
        return tuple(int(s) // 2 for s in shape)
    foreground = np.asarray(label) > 0
    if not foreground.any():
        return tuple(int(s) // 2 for s in foreground.shape)
    centre = []
    for axis, size in enumerate(foreground.shape):
        others = tuple(a for a in range(foreground.ndim) if a != axis)
        weights = foreground.sum(axis=others)
        centre.append(int(round(float(np.dot(np.arange(size), weights)) / float(weights.sum()))))
    return tuple(centre)


def _spacing(image: Any, spacing: Sequence[float] | None) -> tuple[float, float, float]:
    """The given voxel size, else a ``MetaTensor``'s pixdim, else isotropic."""
    if spacing is None:
        pixdim = getattr(image, "pixdim", None)
        spacing = [float(v) for v in _to_numpy(pixdim).ravel()[:3]] if pixdim is not None else (1.0, 1.0, 1.0)
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or any(not s > 0 for s in values):
        raise ValueError(f"spacing should be three positive numbers, got {spacing}.")
    return values  # type: ignore[return-value]


def _orthogonal_slices(volume: np.ndarray, centre: Sequence[int]) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal planes of an ``(x, y, z)`` volume, oriented for display.

    Each plane is transposed and flipped in both directions: for a RAS volume that puts anterior (axial) or
    superior (coronal, sagittal) at the top, the patient's right on the viewer's left (radiological convention)
    and anterior on the left of the sagittal view.
    """
    i, j, k = centre
    planes = {"axial": volume[:, :, k], "coronal": volume[:, j, :], "sagittal": volume[i, :, :]}
    return {name: plane.T[::-1, ::-1] for name, plane in planes.items()}


def _orthogonal_figure(
    image: np.ndarray,
    label: np.ndarray | None,
    class_names: Sequence[str] | Mapping[int, str] | None,
    spacing: Sequence[float],
    title: str | None,
) -> Figure:
    centre = _centre_indices(label, image.shape)
    lo, hi = _window(image)
    images = _orthogonal_slices(image, centre)
    labels = _orthogonal_slices(label, centre) if label is not None else {}
    sx, sy, sz = spacing
    # (row, column) spacing of each displayed plane, so anisotropic voxels keep their physical shape
    aspects = {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}
    positions = {"axial": f"z={centre[2]}", "coronal": f"y={centre[1]}", "sagittal": f"x={centre[0]}"}
    fig = Figure(figsize=(10.5, 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, name in zip(axes, images):
        ax.imshow(images[name], cmap="gray", vmin=lo, vmax=hi, aspect=aspects[name], interpolation="nearest")
        if name in labels:
            ax.imshow(_label_rgba(labels[name]), aspect=aspects[name], interpolation="nearest")
        ax.set_title(f"{name} ({positions[name]})", fontsize=9)
        ax.set_axis_off()
    if label is not None:
        values = [int(v) for v in np.unique(label[label > 0])]
        if values:
            handles = [Patch(color=_label_colour(v), label=_class_name(v, class_names)) for v in values]
            fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_orthogonal_preview(
    image: Any,
    path: str | Path,
    label: Any | None = None,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    spacing: Sequence[float] | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save axial, coronal and sagittal slices of a volume, with its label map overlaid, as one PNG.

    The volume is in MONAI's layout ``(x, y, z)``, as after ``Orientationd(axcodes="RAS")``: the first spatial
    axis indexes sagittal planes, the last axial ones. Panels are shown in the radiological convention (patient
    right on the viewer's left, anterior/superior up); a volume in another orientation still previews, with its
    directions relabelled accordingly. All three planes pass through the label's centre of mass (the volume's
    middle without a label or foreground). Intensities are windowed to the 1st-99th percentile of the volume.

    Args:
        image: ``(x, y, z)`` or ``(1, x, y, z)``, numpy or torch (a ``MetaTensor`` gives its spacing).
        path: the ``.png`` to write; parent folders are created.
        label: integer label map of the same spatial shape, ``0`` is background. Default ``None``.
        class_names: names for the legend: a mapping ``value -> name`` or a sequence indexed by label value
            (entry 0 is background). Unnamed values show as ``label <value>``. Default ``None``.
        spacing: voxel size ``(sx, sy, sz)`` in mm, sets each panel's aspect ratio. Default: the
            ``MetaTensor``'s pixdim, else isotropic.
        title: figure title. Default ``None``.
        overwrite: replace an existing file; otherwise ``FileExistsError``. Default ``False``.

    Returns:
        ``path`` as a ``Path``: a PNG of 1050 x 420 pixels.

    Example::

        save_orthogonal_preview(ct, "preview.png", label=seg, class_names=["background", "liver"])
    """
    target = _target(path, overwrite)
    voxel_size = _spacing(image, spacing)
    volume = np.asarray(_spatial(image, 3, "image"), dtype=np.float32)
    label_map = None
    if label is not None:
        label_map = np.rint(_spatial(label, 3, "label")).astype(np.int64)
        if label_map.shape != volume.shape:
            raise ValueError(f"label should have shape {volume.shape}, got {label_map.shape}.")
    fig = _orthogonal_figure(volume, label_map, class_names, voxel_size, title)
    return _save(fig, target)


def _box_rectangle(box: Sequence[float]) -> tuple[tuple[float, float], float, float]:
    """``(x1, y1, x2, y2)`` to matplotlib's ``Rectangle`` arguments ``((x, y), width, height)``.

    Images are drawn with ``extent=(0, W, H, 0)``: pixel ``(row r, column c)`` covers ``[c, c+1) x [r, r+1)``,
    the same continuous pixel coordinates as MONAI's detection boxes, so corners map unchanged.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1, y1), x2 - x1, y2 - y1


def _heatmap_panels(heatmaps: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    panels = {}
    for name, heatmap in (heatmaps or {}).items():
        values = _spatial(heatmap, 2, f"heatmap '{name}'").astype(np.float32)
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        # each map on its own [0, 1] scale: CAMs have arbitrary units
        panels[str(name)] = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return panels


def _draw_boxes(ax, boxes: np.ndarray, labels: Sequence[Any] | None, scores: Sequence[float] | None) -> None:
    names = [str(v) for v in labels] if labels is not None else [""] * len(boxes)
    order = list(dict.fromkeys(names))  # colour by label, in order of first appearance
    for box, name, score in zip(boxes, names, scores if scores is not None else [None] * len(boxes)):
        colour = colormaps["tab10"](order.index(name) % 10)
        corner, width, height = _box_rectangle(box)
        ax.add_patch(Rectangle(corner, width, height, fill=False, edgecolor=colour, linewidth=1.5))
        text = " ".join(t for t in (name, f"{float(score):.2f}" if score is not None else "") if t)
        if text:
            ax.text(corner[0], corner[1], text, fontsize=7, color="black", va="bottom", ha="left", clip_on=True,
                    bbox={"facecolor": colour, "alpha": 0.7, "pad": 1, "linewidth": 0})


def _overlay_figure(
    image: np.ndarray,
    heatmaps: dict[str, np.ndarray],
    boxes: np.ndarray | None,
    labels: Sequence[Any] | None,
    scores: Sequence[float] | None,
    title: str | None,
    mask: np.ndarray | None,
) -> Figure:
    height, width = image.shape
    extent = (0, width, height, 0)
    lo, hi = _window(image)
    n_panels = 1 + len(heatmaps)
    ncols = min(n_panels, 4)
    nrows = -(-n_panels // ncols)
    panel_height = float(np.clip(4.0 * height / width, 2.0, 8.0))
    fig = Figure(figsize=(4.0 * ncols, panel_height * nrows + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax in axes[:n_panels]:
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, extent=extent)
    if mask is not None and mask.any() and not mask.all():
        # contour levels sit at pixel centres, half a pixel in from the extent's edges
        axes[0].contour(np.arange(width) + 0.5, np.arange(height) + 0.5, mask.astype(np.float32), levels=[0.5],
                        colors=[MASK_COLOUR], linewidths=1.2)
    if boxes is not None and len(boxes):
        _draw_boxes(axes[0], boxes, labels, scores)
    for ax, (name, heatmap) in zip(axes[1:], heatmaps.items()):
        # stretched over the image's extent: a low-resolution map is resized bilinearly at drawing time
        ax.imshow(heatmap, cmap="inferno", vmin=0.0, vmax=1.0, alpha=HEATMAP_ALPHA, extent=extent,
                  interpolation="bilinear")
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_overlay_2d(
    image: Any,
    path: str | Path,
    heatmaps: Mapping[str, Any] | None = None,
    boxes: Any | None = None,
    labels: Sequence[Any] | None = None,
    scores: Sequence[float] | Any | None = None,
    title: str | None = None,
    mask: Any | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a 2D image with boxes, a mask contour and one extra panel per heatmap as one PNG.

    The image is ``(H, W)`` (rows first, as :func:`common.data.read_dicom` returns it); an array in MONAI's
    ``(W, H)`` layout (``LoadImage``) is passed transposed. Intensities are windowed to the 1st-99th percentile.

    Args:
        image: ``(H, W)`` or ``(1, H, W)``, numpy or torch.
        path: the ``.png`` to write; parent folders are created.
        heatmaps: ``name -> (h, w)`` maps (e.g. class activation maps), each drawn over the image in its own
            panel titled ``name``, min-max scaled and stretched to the image. Default ``None``.
        boxes: ``(N, 4)`` boxes ``(x1, y1, x2, y2)`` in pixel coordinates (``x`` along columns; pixel ``(r, c)``
            spans ``[c, c+1) x [r, r+1)``), drawn on the first panel. Default ``None``.
        labels: ``N`` class names or ids written on the boxes; one colour per distinct label. Default ``None``.
        scores: ``N`` confidences written after the labels with two decimals. Default ``None``.
        title: figure title. Default ``None``.
        mask: ``(H, W)`` binary mask whose outline is drawn on the first panel. Default ``None``.
        overwrite: replace an existing file; otherwise ``FileExistsError``. Default ``False``.

    Returns:
        ``path`` as a ``Path``: a PNG 400 pixels wide per panel (up to four per row).

    Example::

        save_overlay_2d(cxr, "cxr.png", heatmaps={"effusion": cam}, boxes=[[40, 60, 120, 200]], labels=["nodule"])
    """
    target = _target(path, overwrite)
    picture = np.asarray(_spatial(image, 2, "image"), dtype=np.float32)
    box_array = None
    if boxes is not None:
        box_array = _to_numpy(boxes).astype(np.float64)
        box_array = box_array.reshape(0, 4) if box_array.size == 0 else box_array
        if box_array.ndim != 2 or box_array.shape[1] != 4:
            raise ValueError(f"boxes should have shape (N, 4), got {tuple(box_array.shape)}.")
    # tensors of class ids or scores become plain lists
    label_list = _to_numpy(labels).ravel().tolist() if labels is not None else None
    score_list = [float(s) for s in _to_numpy(scores).ravel()] if scores is not None else None
    for name, values in (("labels", label_list), ("scores", score_list)):
        if values is not None and len(values) != (0 if box_array is None else len(box_array)):
            raise ValueError(f"{name} should have one entry per box, got {len(values)} for "
                             f"{0 if box_array is None else len(box_array)} boxes.")
    outline = None
    if mask is not None:
        outline = _spatial(mask, 2, "mask") > 0
        if outline.shape != picture.shape:
            raise ValueError(f"mask should have shape {picture.shape}, got {outline.shape}.")
    fig = _overlay_figure(picture, _heatmap_panels(heatmaps), box_array, label_list, score_list, title, outline)
    return _save(fig, target)


def _episode_panels(episode: Mapping[str, Any]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(title, (x, y, z) image, (K, x, y, z) masks)`` of each used reference and the query of an episode."""
    query_masks = _to_numpy(episode["label"]).astype(np.float32)
    # channels holding a class: unused ones are filled with a negative ignore value
    used = np.flatnonzero(query_masks.reshape(len(query_masks), -1).min(1) >= 0)
    ref_images, ref_masks = _to_numpy(episode["ref_image"]), _to_numpy(episode["ref_label"])
    panels = []
    for r in range(ref_images.shape[0]):
        masks = ref_masks[r][used] > 0
        if masks.any():  # empty slots are padding
            panels.append((f"reference {len(panels) + 1}", ref_images[r][0], masks))
    panels.append(("query", _spatial(episode["image"], 3, "image"), query_masks[used] > 0))
    return panels


def save_episode_sheet(
    episodes: Sequence[Mapping[str, Any]],
    path: str | Path,
    titles: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save in-context episodes as one PNG: a row per episode, its references then its query, class outlines on top.

    Each panel is the axial slice (last axis) through the centre of that view's class masks, displayed as in
    :func:`save_orthogonal_preview`; class ``k`` is outlined in the colour of label ``k + 1`` in every panel, so a
    reader sees which structure each reference shows and what the query should be segmented into. Empty reference
    slots (all-zero masks, padding) and unused class channels are not drawn.

    Args:
        episodes: items in the layout of ``common.data.EpisodeDataset``: ``image (1, x, y, z)``, ``label
            (K, x, y, z)``, ``ref_image (R, 1, x, y, z)`` and ``ref_label (R, K, x, y, z)``, numpy or torch.
        path: the ``.png`` to write; parent folders are created.
        titles: one row title per episode. Default ``episode <i>``.
        overwrite: replace an existing file; otherwise ``FileExistsError``. Default ``False``.

    Returns:
        ``path`` as a ``Path``: a PNG 200 pixels per panel, one row per episode.

    Example::

        save_episode_sheet([dataset[i] for i in range(4)], "episodes.png")
    """
    target = _target(path, overwrite)
    if not episodes:
        raise ValueError("episodes should hold at least one episode, got none.")
    if titles is not None and len(titles) != len(episodes):
        raise ValueError(f"titles should have one entry per episode ({len(episodes)}), got {len(titles)}.")
    rows = [_episode_panels(e) for e in episodes]
    ncols = max(len(r) for r in rows)
    fig = Figure(figsize=(2.0 * ncols, 2.1 * len(rows) + 0.3), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(len(rows), ncols, squeeze=False))
    for i, panels in enumerate(rows):
        for j, ax in enumerate(axes[i]):
            ax.set_axis_off()
            if j >= len(panels):
                continue
            name, image, masks = panels[j]
            z = _centre_indices(masks.any(0))[2]
            lo, hi = _window(image)
            ax.imshow(image[:, :, z].T[::-1, ::-1], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            for k, mask in enumerate(masks):
                plane = mask[:, :, z].T[::-1, ::-1].astype(np.float32)
                if plane.any() and not plane.all():
                    ax.contour(plane, levels=[0.5], colors=[_label_colour(k + 1)], linewidths=1.0)
            row_title = titles[i] if titles is not None else f"episode {i}"
            ax.set_title(f"{row_title}: {name} (z={z})" if j == 0 else f"{name} (z={z})", fontsize=7)
    classes = max(len(r[-1][2]) for r in rows)
    handles = [Patch(color=_label_colour(k + 1), label=f"class {k + 1}") for k in range(classes)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    return _save(fig, target)


def _marked_text(text: str, entities: Sequence[Mapping]) -> str:
    """``text`` with each entity wrapped: a finding ``[...]``, a negated finding ``[no: ...]``, anatomy ``<...>``."""
    out, last = [], 0
    for e in sorted(entities, key=lambda e: int(e["start"])):
        start, end = int(e["start"]), int(e["end"])
        if start < last:
            continue
        span = text[start:end]
        if e.get("type") == "ANATOMY":
            marked = f"<{span}>"
        else:
            marked = f"[no: {span}]" if e.get("negated") else f"[{span}]"
        out += [text[last:start], marked]
        last = end
    return "".join(out + [text[last:]])


def save_report_preview(
    text: str,
    path: str | Path,
    names: Sequence[str],
    probabilities: Any,
    thresholds: Any,
    entities: Sequence[Mapping] = (),
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a labelled report as one PNG: the text with its entities marked, and a bar per finding.

    Entities are marked in the text (finding ``[...]``, negated finding ``[no: ...]``, anatomy ``<...>``); the
    bars are the finding probabilities with each finding's threshold as a tick, positive findings filled.

    Args:
        text: the report.
        path: the ``.png`` to write; parent folders are created.
        names: the ``C`` finding names.
        probabilities: ``(C,)`` probabilities.
        thresholds: ``(C,)`` decision thresholds.
        entities: ``{"start", "end", "type", "negated"}`` character spans into ``text``. Default none.
        title: figure title. Default ``None``.
        overwrite: replace an existing file; otherwise ``FileExistsError``. Default ``False``.

    Returns:
        ``path`` as a ``Path``: a PNG 1000 pixels wide.
    """
    path = _target(path, overwrite)
    probs, limits = _to_numpy(probabilities).reshape(-1), _to_numpy(thresholds).reshape(-1)
    if not len(names) == len(probs) == len(limits):
        raise ValueError(f"names, probabilities and thresholds should have one entry per finding, got {len(names)}, "
                         f"{len(probs)} and {len(limits)}.")
    lines = [w for paragraph in _marked_text(text, entities).splitlines()
             for w in (textwrap.wrap(paragraph, 70) or [""])][:30]
    height = max(0.35 * len(names), 0.22 * len(lines)) + 1.2
    fig = Figure(figsize=(10, height), dpi=DPI)
    FigureCanvasAgg(fig)
    text_ax, bar_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    text_ax.axis("off")
    text_ax.text(0, 1, "\n".join(lines), va="top", ha="left", family="DejaVu Sans Mono", fontsize=8,
                 transform=text_ax.transAxes)
    text_ax.set_title("[finding]  [no: negated finding]  <anatomy>", fontsize=8, loc="left")
    positive = probs >= limits
    rows = np.arange(len(names))[::-1]
    bar_ax.barh(rows, probs, color=["#d62728" if p else "#c7c7c7" for p in positive])
    bar_ax.scatter(limits, rows, marker="|", color="black", s=120, zorder=3)
    bar_ax.set_yticks(rows, [str(n) for n in names], fontsize=7)
    bar_ax.set_xlim(0, 1)
    bar_ax.set_xlabel("probability (tick: threshold)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
