"""Synthetic chest radiographs with localised findings ("concepts"), their masks and boxes, and derived diseases.

An image is a frontal (PA) radiograph as displayed after MONOCHROME2 conversion: dense is bright. It is built as a sum
of projected densities -- a soft-tissue trunk whose brightness follows its thickness, dark lungs from a real lung
mask, the mediastinum, heart, spine, ribs and clavicles, vessel markings, smooth low-frequency variation and noise.
Lung shapes come from the 517 hand-drawn lung masks that torchxrayvision ships (``semantic_masks_v7labs_lungs.zip``);
the 434 that hold two side-by-side lungs are used (the others, 82 of them empty, are passed over), each cropped to its
lungs and placed with a random extent. Without torchxrayvision a parametric pair of lungs stands in.

Each concept of :data:`CXR_CONCEPTS` is drawn at a known place and returned with its binary region mask and its
bounding box, so one data set serves a concept-bottleneck classifier (concepts, then diseases) and a lesion
detector (boxes of :data:`LESION_CLASSES`). Diseases follow from the concepts by :data:`DISEASE_RULES`, which are
deliberately noisy so that learning them is measurable but not trivial.

Geometry: the field of view is :data:`FIELD_OF_VIEW_MM` wide, so a pixel is ``FIELD_OF_VIEW_MM / size`` mm and
lesion sizes are given in mm. Boxes are ``(x0, y0, x1, y1)`` in pixels with ``x`` along columns, and pixel
``(r, c)`` spans ``[c, c + 1) x [r, r + 1)``: a mask's box is ``(min col, min row, max col + 1, max row + 1)``.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from .datalist import datalist_target, write_split_datalist
from .synthetic3d import smooth_random_field

__all__ = [
    "CXR_CONCEPTS",
    "CXR_DISEASES",
    "DISEASE_RULES",
    "DiseaseRule",
    "FIELD_OF_VIEW_MM",
    "LESION_CLASSES",
    "diseases_from_concepts",
    "generate_cxr",
    "generate_synthetic_cxr",
    "load_lung_mask",
    "num_lung_masks",
]

FIELD_OF_VIEW_MM = 380.0
MIN_SIZE = 64
MIN_REGION_PIXELS = 3  # a concept squeezed to fewer pixels than this is left out

CXR_CONCEPTS: tuple[str, ...] = (
    "opacity",
    "consolidation",
    "nodule",
    "mass",
    "effusion",
    "cardiomegaly",
    "pneumothorax",
    "atelectasis",
    "calcification",
    "fibrosis",
    "pleural_thickening",
)
"""Local findings, each drawn in one region with a mask and a box. ``cardiomegaly``'s region is the whole heart."""

LESION_CLASSES: tuple[str, ...] = CXR_CONCEPTS
"""Detection classes: every concept. As in VinDr-CXR, which boxes cardiomegaly, pulmonary fibrosis and lung opacity,
diffuse findings are still boxed; each is drawn in one lung (cardiomegaly: the heart), so it has one box."""

CXR_DISEASES: tuple[str, ...] = ("pneumonia", "lung_tumor", "heart_failure", "tuberculosis", "other_disease",
                                 "no_finding")


@dataclass(frozen=True)
class DiseaseRule:
    """Probability that a disease is labelled, given the concepts drawn.

    Args:
        clauses: ``(required concepts, probability)`` pairs, tried in order; the first whose concepts are all drawn
            gives the probability of a positive label.
        otherwise: probability of a positive label when no clause matches (label noise / unseen causes).
    """

    clauses: tuple[tuple[tuple[str, ...], float], ...]
    otherwise: float


DISEASE_RULES: dict[str, DiseaseRule] = {
    "pneumonia": DiseaseRule(((("consolidation",), 0.9), (("opacity",), 0.9)), 0.03),
    "lung_tumor": DiseaseRule(((("mass",), 0.85), (("nodule",), 0.85)), 0.02),
    "heart_failure": DiseaseRule(
        ((("cardiomegaly", "effusion"), 0.9), (("cardiomegaly",), 0.5), (("effusion",), 0.3)), 0.02),
    "tuberculosis": DiseaseRule(
        ((("calcification", "fibrosis"), 0.8), (("calcification", "pleural_thickening"), 0.7),
         (("calcification", "consolidation"), 0.6)), 0.01),
    "other_disease": DiseaseRule(((("pneumothorax",), 0.85), (("fibrosis",), 0.6), (("atelectasis",), 0.6)), 0.03),
}
"""Rules for every disease but ``no_finding``, which is 1 exactly when no concept is drawn and no other disease is
labelled (it carries no extra noise). Read ``pneumonia`` as: P(label) = 0.9 with consolidation, else 0.9 with
opacity, else 0.03; ``heart_failure``: 0.9 with cardiomegaly and effusion, 0.5 with cardiomegaly alone, 0.3 with
effusion alone, else 0.02."""

_LUNG_ZIP = "data/semantic_masks_v7labs_lungs.zip"
_CANONICAL = 256  # lung masks are cached cropped to their lungs at this resolution


# ---------------------------------------------------------------------------------------------------------- lungs
@functools.lru_cache(maxsize=1)
def _lung_zip_names() -> tuple[Path | None, tuple[str, ...]]:
    # located without importing torchxrayvision, whose import pulls in much of torchvision
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        return None, ()
    path = Path(spec.origin).parent / _LUNG_ZIP
    if not path.is_file():
        return None, ()
    with zipfile.ZipFile(path) as archive:
        names = sorted(n for n in archive.namelist() if not n.endswith("/"))
    return path, tuple(names)


def num_lung_masks() -> int:
    """Number of lung masks available from torchxrayvision (0 when it is not installed)."""
    return len(_lung_zip_names()[1])


def load_lung_mask(index: int, size: int = 256) -> np.ndarray:
    """One of torchxrayvision's v7labs lung masks, binarised and resized to ``(size, size)`` (its aspect is lost).

    Args:
        index: in ``[0, num_lung_masks())``, in sorted file-name order.
        size: output side in pixels. Default 256.

    Returns:
        bool ``(size, size)``; some masks of the archive are empty.
    """
    path, names = _lung_zip_names()
    if not 0 <= index < len(names):
        raise ValueError(f"index should be in [0, {len(names)}), got {index}.")
    with zipfile.ZipFile(path) as archive:
        image = Image.open(io.BytesIO(archive.read(names[index])))
    image.draft("L", (2 * size, 2 * size))  # JPEG masks decode at reduced scale: many are 2000 pixels wide
    image = image.convert("L").resize((size, size), Image.BILINEAR)
    return np.asarray(image) > 127


@functools.lru_cache(maxsize=None)
def _canonical_lungs(index: int) -> tuple[np.ndarray, float] | None:
    """Mask ``index`` cropped to its two lungs, ``_CANONICAL`` pixels square, and its height/width; None if unfit."""
    mask = load_lung_mask(index, _CANONICAL)
    labels, count = ndimage.label(mask)
    if count < 2:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    first, second = np.argsort(sizes)[::-1][:2] + 1
    if sizes[second - 1] < 0.25 * sizes[first - 1] or mask.mean() < 0.1:
        return None
    centres = [ndimage.center_of_mass(labels == k)[1] for k in (first, second)]
    if abs(centres[0] - centres[1]) < 0.25 * _CANONICAL:  # not side by side
        return None
    lungs = (labels == first) | (labels == second)
    rows, cols = np.nonzero(lungs)
    crop = lungs[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    aspect = crop.shape[0] / crop.shape[1]
    resized = Image.fromarray(crop.astype(np.uint8) * 255).resize((_CANONICAL, _CANONICAL), Image.BILINEAR)
    return np.asarray(resized), float(aspect)


def _parametric_lungs(rng: np.random.Generator) -> np.ndarray:
    """Two lung shapes (uint8 0/255, canonical frame) for when no real mask is available.

    Each lung narrows to a rounded apex, has a fairly straight medial border and a domed base that is lowest at the
    lateral costophrenic angle.
    """
    y, x = np.mgrid[0:_CANONICAL, 0:_CANONICAL] / (_CANONICAL - 1.0)
    mask = np.zeros((_CANONICAL, _CANONICAL), dtype=bool)
    for centre, outward in ((0.22, -1.0), (0.78, 1.0)):
        half_width = 0.22 * rng.uniform(0.92, 1.0)
        u = outward * (x - centre) / half_width  # -1 medial, +1 lateral
        v = 2.0 * y - 1.0  # -1 apex, +1 base
        taper = 0.35 + 0.65 * np.sqrt(np.clip((v + 1.0) / 1.2, 0.0, 1.0))
        apex = v >= -1.0 + 0.5 * (u / taper) ** 2
        base = v <= 1.0 - rng.uniform(0.15, 0.3) * (1.0 - ((u + 1.0) / 2.0) ** 2)
        mask |= (np.abs(u) <= taper) & apex & base
    return mask.astype(np.uint8) * 255


def _place_lungs(rng: np.random.Generator, size: int) -> np.ndarray:
    """A real (or parametric) lung pair placed in a ``size`` image with a plausible position and extent."""
    count = num_lung_masks()
    canonical, aspect = None, 0.9
    for _ in range(20 if count else 0):
        found = _canonical_lungs(int(rng.integers(count)))
        if found is not None:
            canonical, aspect = found
            break
    if canonical is None:
        canonical = _parametric_lungs(rng)
    width = rng.uniform(0.62, 0.74) * size
    height = np.clip(aspect * rng.uniform(0.9, 1.1), 0.78, 1.05) * width
    height = min(height, 0.76 * size)
    top = rng.uniform(0.07, 0.12) * size
    left = 0.5 * size - 0.5 * width + rng.uniform(-0.015, 0.015) * size
    w, h = max(int(round(width)), 8), max(int(round(height)), 8)
    resized = np.asarray(Image.fromarray(canonical).resize((w, h), Image.BILINEAR)) > 127
    out = np.zeros((size, size), dtype=bool)
    r0, c0 = int(round(top)), int(round(left))
    r1, c1 = min(r0 + h, size), min(c0 + w, size)
    out[r0:r1, c0:c1] = resized[: r1 - r0, : c1 - c0]
    return out


def _split_lungs(lungs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image-left, image-right) lung: the two largest components, or halves at the mask's middle column."""
    labels, count = ndimage.label(lungs)
    if count >= 2:
        sizes = np.bincount(labels.ravel())[1:]
        first, second = np.argsort(sizes)[::-1][:2] + 1
        a, b = labels == first, labels == second
        if sizes[second - 1] >= 0.2 * sizes[first - 1]:
            return (a, b) if np.nonzero(a)[1].mean() < np.nonzero(b)[1].mean() else (b, a)
    cols = np.nonzero(lungs)[1]
    middle = 0.5 * (cols.min() + cols.max())
    column = np.arange(lungs.shape[1])[None, :]
    return lungs & (column < middle), lungs & (column >= middle)


# -------------------------------------------------------------------------------------------------------- drawing
@dataclass
class _Canvas:
    """The image under construction: projected density, lung aeration and where lung texture shows."""

    density: np.ndarray  # brightness added by tissue, bone and lesions
    aeration: np.ndarray  # 1 where the lung holds air, reduced by fluid and collapse
    texture: np.ndarray  # 1 where vessel markings show; 0 in a pneumothorax
    lungs: list[np.ndarray]  # [image-left, image-right] lung masks, as they stand after volume loss
    heart: np.ndarray
    free: np.ndarray  # lung not taken by effusion, pneumothorax or pleural thickening
    mm: float  # millimetres per pixel
    rows: np.ndarray
    cols: np.ndarray

    @property
    def lung(self) -> np.ndarray:
        return (self.lungs[0] | self.lungs[1]) & ~self.heart


def _smooth_step(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma) if sigma > 0 else mask.astype(np.float32)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _inside_distance(mask: np.ndarray) -> np.ndarray:
    """Distance to the nearest pixel outside ``mask`` (0 outside), computed on the mask's bounding box only."""
    out = np.zeros(mask.shape, dtype=np.float64)
    if mask.any():
        x0, y0, x1, y1 = _bbox(mask)
        crop = np.pad(mask[y0:y1, x0:x1], 1)
        out[y0:y1, x0:x1] = ndimage.distance_transform_edt(crop)[1:-1, 1:-1]
    return out


def _window(centre: tuple[int, int], half: float, shape: tuple[int, ...]) -> tuple[slice, slice]:
    r, c, h = int(centre[0]), int(centre[1]), int(np.ceil(half))
    return slice(max(r - h, 0), min(r + h + 1, shape[0])), slice(max(c - h, 0), min(c + h + 1, shape[1]))


def _pick(rng: np.random.Generator, candidates: np.ndarray) -> tuple[int, int] | None:
    rows, cols = np.nonzero(candidates)
    if rows.size == 0:
        return None
    i = int(rng.integers(rows.size))
    return int(rows[i]), int(cols[i])


def _lung_geometry(lung: np.ndarray) -> tuple[int, int, int, int, bool]:
    """(top, bottom, medial col, lateral col, lateral is to the left) of one lung."""
    x0, y0, x1, y1 = _bbox(lung)
    lateral_left = (x0 + x1) / 2.0 < lung.shape[1] / 2.0
    return y0, y1 - 1, (x1 - 1 if lateral_left else x0), (x0 if lateral_left else x1 - 1), lateral_left


def _lateral_fraction(canvas: _Canvas, lung: np.ndarray) -> np.ndarray:
    """0 at the lung's medial edge, 1 at its lateral edge (per column)."""
    _, _, medial, lateral, _ = _lung_geometry(lung)
    return np.clip((canvas.cols - medial) / (lateral - medial + 1e-6), 0.0, 1.0)


def _diaphragm(canvas: _Canvas, size: int) -> np.ndarray:
    """Row of the diaphragm per column: the lungs' lower edge, bridged under the heart.

    The medial quarter of a lung's lower edge follows the heart border rather than the diaphragm, so only the lateral
    three quarters are kept; the line is interpolated between them and held flat beyond the lungs.
    """
    kept_cols, kept_rows = [], []
    for lung in canvas.lungs:
        cols = np.nonzero(lung.any(axis=0))[0]
        bottoms = size - 1 - np.argmax(lung[::-1, cols], axis=0)
        _, _, medial, lateral, _ = _lung_geometry(lung)
        keep = np.abs(cols - lateral) <= 0.75 * abs(lateral - medial) + 1
        kept_cols.append(cols[keep])
        kept_rows.append(bottoms[keep])
    cols, rows = np.concatenate(kept_cols), np.concatenate(kept_rows)
    order = np.argsort(cols)
    line = np.interp(np.arange(size), cols[order], rows[order].astype(np.float64))
    return ndimage.gaussian_filter1d(line, 0.01 * size)


def _body(rng: np.random.Generator, canvas: _Canvas, size: int) -> tuple[float, np.ndarray]:
    """Soft-tissue trunk and neck, brighter abdomen below the diaphragm; returns the spine column and diaphragm."""
    lungs = canvas.lungs[0] | canvas.lungs[1]
    x0, y0, x1, y1 = _bbox(lungs)
    centre = 0.5 * (x0 + x1)
    half_trunk = 0.5 * (x1 - x0) * rng.uniform(1.15, 1.3) * (0.94 + 0.08 * np.clip(canvas.rows / size, 0.0, 1.0))
    half_neck = 0.12 * size * rng.uniform(0.9, 1.15)
    shoulder = y0 - rng.uniform(0.0, 0.05) * size
    # the half width narrows from trunk to neck over a short distance above the shoulders
    blend = _smooth_step((shoulder - canvas.rows) / (0.08 * size))
    half = half_trunk * (1.0 - blend) + half_neck * blend
    thickness = np.sqrt(np.clip(1.0 - ((canvas.cols - centre) / half) ** 2, 0.0, 1.0))
    canvas.density += rng.uniform(0.5, 0.58) * thickness
    diaphragm = _diaphragm(canvas, size)
    below = _smooth_step((canvas.rows - diaphragm[None, :] + 0.01 * size) / (0.05 * size))
    canvas.density += rng.uniform(0.06, 0.1) * below * thickness
    return float(centre), diaphragm


def _heart(rng: np.random.Generator, canvas: _Canvas, spine: float, diaphragm: np.ndarray, enlarged: bool) -> None:
    """Heart shadow: a tilted ellipse low in the middle whose width is the cardiothoracic ratio times the thorax.

    The thorax width is the outer extent of both lungs; the ratio is drawn from [0.38, 0.46] for a normal heart and
    [0.56, 0.66] with cardiomegaly. The heart hides the lung behind it, is about as dense as the mediastinum and
    ends at the diaphragm.
    """
    x0, _, x1, _ = _bbox(canvas.lungs[0] | canvas.lungs[1])
    ratio = rng.uniform(0.56, 0.66) if enlarged else rng.uniform(0.38, 0.46)
    half_width = 0.5 * ratio * (x1 - x0)
    angle = np.deg2rad(rng.uniform(15.0, 30.0))
    b_over_a = rng.uniform(0.62, 0.75)
    # semi-axes chosen so that the tilted ellipse spans exactly 2 * half_width horizontally
    a = half_width / np.sqrt(np.cos(angle) ** 2 + (b_over_a * np.sin(angle)) ** 2)
    b = b_over_a * a
    cx = spine + rng.uniform(0.12, 0.2) * 2.0 * half_width  # most of the heart lies left of the spine (image right)
    # resting on the diaphragm; the widest rows stay above it, so the drawn ratio survives the cut below
    cy = diaphragm[int(np.clip(round(cx), 0, diaphragm.size - 1))] - rng.uniform(0.5, 0.75) * b
    dx, dy = canvas.cols - cx, canvas.rows - cy
    u = dx * np.cos(angle) - dy * np.sin(angle)
    v = dx * np.sin(angle) + dy * np.cos(angle)
    canvas.heart = ((u / a) ** 2 + (v / b) ** 2 <= 1.0) & (canvas.rows <= diaphragm[None, :] + 0.02 * b)
    canvas.density += rng.uniform(0.02, 0.04) * _soft(canvas.heart, 1.0)


def _ribs(canvas: _Canvas, spine: float, amplitude: float, anterior: float) -> np.ndarray:
    """Posterior ribs arching out from the spine and down the lateral wall, fainter anterior ribs sloping medially."""
    rows, cols = canvas.rows, canvas.cols
    x0, y0, x1, y1 = _bbox(canvas.lungs[0] | canvas.lungs[1])
    height = y1 - y0
    u = np.abs(cols - spine) / (0.5 * (x1 - x0) * 1.05)
    inside = _smooth_step((1.1 - u) / 0.1) * _smooth_step(u / 0.12)
    # rib centre lines: level near the spine, dropping ever faster towards the lateral chest wall
    drop = height * (0.45 * np.clip(u - 0.55, 0.0, None) ** 2 - 0.06 * np.sin(0.8 * np.pi * np.minimum(u, 1.0)))
    along = (rows - drop - y0 + 0.08 * height) / (1.08 * height)
    phase = 9.0 * np.clip(along, 0.0, None) ** 0.8
    wave = np.cos(2.0 * np.pi * phase)
    band = _smooth_step((wave - 0.45) / 0.3) + 0.5 * np.exp(-((wave - 0.45) / 0.08) ** 2)  # bright cortex edges
    posterior = band * inside * _smooth_step(along / 0.03) * _smooth_step((1.02 - along) / 0.05)
    rise = height * (0.28 * np.clip(1.0 - u, 0.0, 1.0) ** 1.5)
    front_along = (rows + rise - y0 - 0.1 * height) / (0.95 * height)
    front = _smooth_step((np.cos(2.0 * np.pi * 5.5 * np.clip(front_along, 0.0, None)) - 0.55) / 0.45)
    front *= inside * (front_along > 0.0) * _smooth_step((0.9 - front_along) / 0.1) * _smooth_step((u - 0.25) / 0.2)
    return amplitude * posterior + anterior * front


def _spine_and_bones(rng: np.random.Generator, canvas: _Canvas, spine: float, size: int) -> None:
    """Spine column with vertebrae, ribs, clavicles."""
    rows, cols = canvas.rows, canvas.cols
    half = 0.035 * size
    column = np.sqrt(np.clip(1.0 - ((cols - spine) / half) ** 2, 0.0, 1.0))
    period = rng.uniform(0.04, 0.05) * size
    vertebrae = 0.75 + 0.25 * np.cos(2.0 * np.pi * rows / period + rng.uniform(0, 2 * np.pi))
    canvas.density += rng.uniform(0.06, 0.1) * column * vertebrae
    canvas.density += _ribs(canvas, spine, rng.uniform(0.035, 0.05), rng.uniform(0.015, 0.025))
    y0 = _bbox(canvas.lungs[0] | canvas.lungs[1])[1]
    for sign in (-1.0, 1.0):  # clavicles: gently S-shaped bands from the sternal notch up and out
        t = np.clip(sign * (cols - spine) / (0.42 * size), 0.0, 1.0)
        line = y0 + 0.015 * size - 0.06 * size * t + 0.02 * size * np.sin(np.pi * t) ** 2
        clavicle = np.exp(-(((rows - line) / (0.012 * size)) ** 2))
        clavicle *= _smooth_step((sign * (cols - spine) - 0.03 * size) / (0.02 * size)) * (t < 1.0)
        canvas.density += rng.uniform(0.06, 0.09) * clavicle


def _vessel_tree(rng: np.random.Generator, lung: np.ndarray, layers: list[np.ndarray]) -> None:
    """Branching vessels from one hilum: each branch wanders a little and forks in two, thinner and shorter."""
    size = lung.shape[0]
    top, bottom, medial, lateral, _ = _lung_geometry(lung)
    height, outward = bottom - top, np.sign(lateral - medial)
    count = 6  # first branches fan out upwards, outwards and downwards (angles from the outward horizontal)
    angles = np.deg2rad(np.linspace(-70.0, 75.0, count) + rng.uniform(-10.0, 10.0, count))
    hilum = np.array([top + 0.45 * height, medial + 0.1 * (lateral - medial)])
    starts = hilum + rng.normal(0.0, 0.04 * height, (count, 2))
    lengths = 0.16 * height * rng.uniform(0.8, 1.2, count)
    for layer in layers:
        steps = max(int(lengths.max()), 2)
        heading = angles[:, None] + np.cumsum(rng.normal(0.0, 0.08, (angles.size, steps)), axis=1)  # wandering course
        moves = np.stack([np.sin(heading), outward * np.cos(heading)], axis=-1) * (lengths / steps)[:, None, None]
        points = starts[:, None, :] + np.cumsum(moves, axis=1)
        r, c = np.rint(points.reshape(-1, 2)).astype(int).T
        inside = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        layer[r[inside], c[inside]] = 1.0
        turns = rng.uniform(0.2, 0.55, (angles.size, 2)) * np.array([-1.0, 1.0])
        angles = (heading[:, -1:] + turns).ravel()
        starts = np.repeat(points[:, -1], 2, axis=0)
        lengths = np.repeat(lengths, 2) * rng.uniform(0.6, 0.8, angles.size)


def _vessels(rng: np.random.Generator, canvas: _Canvas, size: int) -> np.ndarray:
    """Vessel markings and hila: branching trees that thin out towards the periphery, and dense hilar shadows."""
    layers = [np.zeros((size, size), dtype=np.float32) for _ in range(5)]
    hila = np.zeros((size, size), dtype=np.float32)
    for lung in canvas.lungs:
        _vessel_tree(rng, lung, layers)
        top, bottom, medial, lateral, _ = _lung_geometry(lung)
        hy, hx = top + 0.45 * (bottom - top), medial + 0.08 * (lateral - medial)
        distance = np.hypot(canvas.rows - hy, (canvas.cols - hx) * 1.4) / size
        hila = np.maximum(hila, np.exp(-((distance / 0.05) ** 2)))
    markings = np.zeros((size, size), dtype=np.float32)
    for level, layer in enumerate(layers):
        sigma = max(1.2 * 0.7**level / canvas.mm, 0.5)  # vessels a few mm wide at the hilum, under 1 mm at the edge
        markings += 0.07 * 0.8**level * np.clip(ndimage.gaussian_filter(layer, sigma) * 2.5 * sigma, 0.0, 1.0)
    return markings + 0.06 * hila


# ------------------------------------------------------------------------------------------------------- concepts
def _blob(rng: np.random.Generator, canvas: _Canvas, centre: tuple[int, int], radius: float, wobble: float,
          ) -> np.ndarray:
    """Lobulated region around ``centre``: a disc whose radius is modulated by smooth noise."""
    rows, cols = _window(centre, radius * (1.0 + 1.5 * wobble) + 1, canvas.density.shape)
    r = np.hypot(canvas.rows[rows] - centre[0], canvas.cols[:, cols] - centre[1])
    noise = smooth_random_field(rng, r.shape, 5, 1.0)
    region = np.zeros(canvas.density.shape, dtype=bool)
    region[rows, cols] = r <= radius * (1.0 + wobble * np.clip(noise, -1.5, 1.5))
    return region


def _available(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """One lung chosen at random, less the heart and the fluid and air collections already drawn; None if tiny."""
    lung = canvas.lungs[int(rng.integers(2))] & ~canvas.heart & canvas.free
    return lung if lung.sum() >= 16 else None


def _draw_atelectasis(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """Volume loss (raised hemidiaphragm) and a dense plate-like band in the lower lung."""
    side = int(rng.integers(2))
    top, bottom, _, _, _ = _lung_geometry(canvas.lungs[side])
    raise_by = int(rng.uniform(0.06, 0.12) * (bottom - top))
    canvas.lungs[side] = canvas.lungs[side] & (canvas.rows < bottom - raise_by)
    lung = canvas.lungs[side] & ~canvas.heart
    if lung.sum() < 16:
        return None
    top, bottom, medial, lateral, _ = _lung_geometry(lung)
    y = top + rng.uniform(0.55, 0.8) * (bottom - top)
    angle = np.deg2rad(rng.uniform(-20.0, 20.0))
    cx = medial + rng.uniform(0.35, 0.65) * (lateral - medial)
    half_length = rng.uniform(0.25, 0.4) * abs(lateral - medial)
    thickness = rng.uniform(4.0, 9.0) / canvas.mm
    along = (canvas.cols - cx) * np.cos(angle) + (canvas.rows - y) * np.sin(angle)
    across = -(canvas.cols - cx) * np.sin(angle) + (canvas.rows - y) * np.cos(angle)
    # a wedge: thicker medially, tapering laterally
    taper = 1.0 - 0.5 * np.clip(along / half_length, -1.0, 1.0) * np.sign(lateral - medial)
    region = (np.abs(along) <= half_length) & (np.abs(across) <= 0.5 * thickness * taper) & lung
    _fill(canvas, region, rng.uniform(0.6, 0.85), rng.uniform(0.01, 0.03), 1.0)
    return region


def _fill(canvas: _Canvas, region: np.ndarray, air_loss: float | np.ndarray, extra: float, sigma_mm: float) -> None:
    """Replace air by fluid or tissue in ``region`` (edges blurred by ``sigma_mm``) and add density."""
    soft = _soft(region, sigma_mm / canvas.mm)
    canvas.aeration *= 1.0 - air_loss * soft
    canvas.density += extra * soft


def _draw_effusion(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """Fluid layering at a lung base, its meniscus rising towards the lateral chest wall."""
    lung = _available(rng, canvas)
    if lung is None:
        return None
    top, bottom, _, _, _ = _lung_geometry(lung)
    height = bottom - top
    lateral = _lateral_fraction(canvas, lung)
    level = bottom - rng.uniform(0.1, 0.25) * height - rng.uniform(0.12, 0.25) * height * lateral**2
    depth = (canvas.rows - level) / (0.06 * height)
    region = lung & (depth > 0)
    soft = _smooth_step(depth) * lung
    canvas.aeration *= 1.0 - soft
    canvas.density += rng.uniform(0.03, 0.06) * soft
    canvas.free &= ~region
    return region


def _draw_pneumothorax(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """Air between the chest wall and a collapsed lung at the apex and lateral edge, with a pleural line."""
    lung = _available(rng, canvas)
    if lung is None:
        return None
    top, bottom, medial, lateral, _ = _lung_geometry(lung)
    # the lung shrinks towards its medial base, so the gap opens apically and laterally
    anchor = np.array([bottom - 0.1 * (bottom - top), medial + 0.1 * (lateral - medial)])
    scale = rng.uniform(0.72, 0.85)
    collapsed = ndimage.affine_transform(lung.astype(np.uint8), np.eye(2) / scale,
                                         offset=anchor - anchor / scale, order=0).astype(bool)
    region = lung & ~collapsed
    canvas.aeration *= 1.0 - 0.15 * (collapsed & lung)  # the collapsed lung holds less air
    line = collapsed & ~ndimage.binary_erosion(collapsed, iterations=max(1, int(round(1.0 / canvas.mm))))
    line &= ndimage.binary_dilation(region, iterations=2)
    canvas.texture *= 1.0 - _soft(region, 0.7)
    canvas.density -= rng.uniform(0.05, 0.08) * _soft(region, 0.7)
    canvas.density += rng.uniform(0.08, 0.12) * _soft(line, 0.5)
    canvas.free &= ~region
    return region


def _draw_pleural_thickening(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """Bright rim along the lateral chest wall over part of one lung."""
    lung = _available(rng, canvas)
    if lung is None:
        return None
    top, bottom, _, _, _ = _lung_geometry(lung)
    width = rng.uniform(4.0, 10.0) / canvas.mm
    inside = _inside_distance(lung)
    start = top + rng.uniform(0.05, 0.45) * (bottom - top)
    stop = start + rng.uniform(0.25, 0.45) * (bottom - top)
    region = lung & (inside <= width) & (_lateral_fraction(canvas, lung) > 0.55)
    region &= (canvas.rows >= start) & (canvas.rows <= stop)
    _fill(canvas, region, 1.0, rng.uniform(0.05, 0.08), 1.0)
    canvas.free &= ~region
    return region


def _draw_fibrosis(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """Reticular (net-like) texture over an irregular lower, peripheral zone of one lung."""
    lung = _available(rng, canvas)
    if lung is None:
        return None
    top, bottom, _, _, _ = _lung_geometry(lung)
    size = canvas.density.shape[0]
    lower = (canvas.rows - top - rng.uniform(0.3, 0.5) * (bottom - top)) / (0.3 * (bottom - top))
    outer = (_lateral_fraction(canvas, lung) - rng.uniform(0.1, 0.3)) / 0.4
    weight = _smooth_step(lower) * _smooth_step(outer) + smooth_random_field(rng, (size, size), 8, 0.25)
    zone = lung & (weight > 0.5)
    noise = rng.standard_normal((size, size)).astype(np.float32)
    scale = 2.0 / canvas.mm  # net cells a few mm across
    band = ndimage.gaussian_filter(noise, scale) - ndimage.gaussian_filter(noise, 2.0 * scale)
    net = np.exp(-((band / (0.35 * band.std() + 1e-6)) ** 2))  # bright lines along the zero crossings
    net = ndimage.gaussian_filter(net, 0.5 / canvas.mm)
    soft = _soft(zone, 1.5 / canvas.mm)
    canvas.density += rng.uniform(0.08, 0.12) * net * soft
    canvas.aeration *= 1.0 - 0.2 * soft
    return zone


def _draw_patch(rng: np.random.Generator, canvas: _Canvas, radius_mm: tuple[float, float],
                air_loss: tuple[float, float], sigma_mm: float) -> np.ndarray | None:
    """An irregular patch of partial (opacity) or near-complete (consolidation) air loss with mottled density."""
    lung = _available(rng, canvas)
    if lung is None:
        return None
    radius = rng.uniform(*radius_mm) / canvas.mm
    inside = _inside_distance(lung)
    centre = _pick(rng, inside >= min(0.6 * radius, 0.8 * inside.max()))
    if centre is None:
        return None
    region = _blob(rng, canvas, centre, radius, 0.4) & lung
    size = canvas.density.shape[0]
    mottle = np.clip(1.0 + smooth_random_field(rng, (size, size), max(4, int(size / radius * 2)), 0.15), 0.5, 1.0)
    _fill(canvas, region, rng.uniform(*air_loss) * mottle, 0.01, sigma_mm)
    return region


def _draw_opacity(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """Ill-defined, ground-glass-like brighter patch: partial loss of air with soft edges."""
    return _draw_patch(rng, canvas, (20.0, 40.0), (0.3, 0.45), 5.0)


def _draw_consolidation(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """Dense confluent patch with dark air bronchograms (branching air-filled airways)."""
    region = _draw_patch(rng, canvas, (18.0, 32.0), (0.8, 1.0), 2.0)
    if region is None:
        return None
    rows, cols = np.nonzero(region)
    cy, cx = rows.mean(), cols.mean()
    bronchi = np.zeros_like(region)
    span = 0.5 * max(np.ptp(rows), np.ptp(cols))
    for _ in range(int(rng.integers(2, 5))):
        angle = rng.uniform(0, 2 * np.pi)
        for t in np.linspace(-0.2, 0.9, max(8, int(2 * span))):
            bend = 0.3 * np.sin(3.0 * t + angle)
            r = int(round(cy + t * span * np.sin(angle + bend)))
            c = int(round(cx + t * span * np.cos(angle + bend)))
            if 0 <= r < region.shape[0] and 0 <= c < region.shape[1]:
                bronchi[r, c] = True
    bronchi = ndimage.binary_dilation(bronchi, iterations=max(0, int(round(0.8 / canvas.mm)))) & region
    canvas.aeration = np.where(bronchi, np.maximum(canvas.aeration, 0.55), canvas.aeration)
    return region


def _draw_round(rng: np.random.Generator, canvas: _Canvas, diameter_mm: tuple[float, float], wobble: float,
                air_loss: tuple[float, float], edge_mm: float) -> np.ndarray | None:
    """A round or lobulated solid lesion wholly inside one lung."""
    lung = _available(rng, canvas)
    if lung is None:
        return None
    radius = 0.5 * rng.uniform(*diameter_mm) / canvas.mm
    radius = max(radius, 1.5)
    inside = _inside_distance(lung)
    centre = _pick(rng, inside >= radius * (1.0 + wobble) + 1.0)
    if centre is None:
        return None
    region = _blob(rng, canvas, centre, radius, wobble) & lung
    _fill(canvas, region, rng.uniform(*air_loss), rng.uniform(0.01, 0.03), edge_mm)
    return region


def _draw_nodule(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """Small round dense blob, 5-15 mm across."""
    return _draw_round(rng, canvas, (5.0, 15.0), 0.05, (0.6, 0.85), 0.8)


def _draw_mass(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """Larger lobulated dense blob, 30-60 mm across."""
    return _draw_round(rng, canvas, (30.0, 60.0), 0.15, (0.75, 0.95), 1.5)


def _draw_calcification(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """A cluster of tiny very bright specks (calcified granulomas)."""
    lung = _available(rng, canvas)
    if lung is None:
        return None
    spread = rng.uniform(4.0, 10.0) / canvas.mm
    inside = _inside_distance(lung)
    centre = _pick(rng, inside >= spread + 2.0)
    if centre is None:
        return None
    region = np.zeros_like(lung)
    for _ in range(int(rng.integers(2, 6))):
        offset = rng.uniform(-spread, spread, size=2)
        radius = max(rng.uniform(0.8, 2.0) / canvas.mm, 0.8)
        region |= np.hypot(canvas.rows - centre[0] - offset[0], canvas.cols - centre[1] - offset[1]) <= radius
    region &= lung
    canvas.density += rng.uniform(0.3, 0.45) * _soft(region, 0.3)
    return region


def _draw_cardiomegaly(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray | None:
    """The heart, already drawn enlarged; its region is the heart."""
    return canvas.heart.copy()


# drawing order: structure first (volume loss, pleura), then parenchyma, which avoids fluid and air collections
_DRAWERS: dict[str, Callable[[np.random.Generator, _Canvas], np.ndarray | None]] = {
    "cardiomegaly": _draw_cardiomegaly,
    "atelectasis": _draw_atelectasis,
    "effusion": _draw_effusion,
    "pneumothorax": _draw_pneumothorax,
    "pleural_thickening": _draw_pleural_thickening,
    "fibrosis": _draw_fibrosis,
    "opacity": _draw_opacity,
    "consolidation": _draw_consolidation,
    "mass": _draw_mass,
    "nodule": _draw_nodule,
    "calcification": _draw_calcification,
}


# -------------------------------------------------------------------------------------------------------- labels
def diseases_from_concepts(concepts: Mapping[str, int], rng: np.random.Generator) -> dict[str, int]:
    """Disease labels drawn from the concepts present, by :data:`DISEASE_RULES`.

    Args:
        concepts: concept name -> 0/1 (missing names count as 0).
        rng: random generator; one uniform draw per rule, in :data:`DISEASE_RULES` order.

    Returns:
        disease name -> 0/1 for every name of :data:`CXR_DISEASES`.
    """
    present = {name for name, value in concepts.items() if value}
    unknown = present - set(CXR_CONCEPTS)
    if unknown:
        raise ValueError(f"concepts should be names from CXR_CONCEPTS, got {sorted(unknown)}.")
    labels = {}
    for disease, rule in DISEASE_RULES.items():
        probability = next((p for needed, p in rule.clauses if present.issuperset(needed)), rule.otherwise)
        labels[disease] = int(rng.random() < probability)
    labels["no_finding"] = int(not present and not any(labels.values()))
    return {name: labels[name] for name in CXR_DISEASES}


# ------------------------------------------------------------------------------------------------------ generator
def _check_concepts(concepts: Sequence[str] | None) -> tuple[str, ...] | None:
    if concepts is None:
        return None
    if isinstance(concepts, str) or any(c not in CXR_CONCEPTS for c in concepts):
        raise ValueError(f"concepts should be a sequence of names from {CXR_CONCEPTS}, got {concepts!r}.")
    return tuple(concepts)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size should be an integer >= {MIN_SIZE}, got {size}.")
    return int(size)


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} should be in [0, 1], got {value}.")
    return float(value)


def generate_cxr(
    rng: np.random.Generator,
    size: int = 256,
    lung_mask: np.ndarray | None = None,
    concepts: Sequence[str] | None = None,
    concept_prob: float = 0.3,
) -> dict:
    """One synthetic chest radiograph with its concepts, their masks and boxes, and its disease labels.

    Args:
        rng: random generator; the same state gives the same image.
        size: image side in pixels, >= 64. Default 256.
        lung_mask: ``(h, w)`` lung mask in image coordinates (resized to ``(size, size)`` when it differs); its two
            largest components (or its halves) are the lungs. Default ``None``: a torchxrayvision v7labs mask drawn
            at random and placed with a random extent.
        concepts: names to draw, all of them (a concept that finds no room is left out and reported 0).
            Default ``None``: each concept independently with probability ``concept_prob``.
        concept_prob: probability of each concept when ``concepts`` is None, in [0, 1]. Default 0.3 (so about
            2% of images have no finding; use 0.1 for about a third).

    Returns:
        dict with ``image`` (float32 ``(size, size)`` in [0, 1], dense is bright), ``concepts`` (name -> 0/1 for
        every concept), ``diseases`` (name -> 0/1, from :func:`diseases_from_concepts`), ``masks`` (name -> bool
        ``(size, size)`` for drawn concepts), ``boxes`` (``(name, x0, y0, x1, y1)`` ints, one per drawn concept, in
        :data:`CXR_CONCEPTS` order), ``lung_mask`` (bool, the visible lung fields: both lungs after any volume loss,
        less the heart) and ``heart_mask`` (bool).

    Example:
        >>> sample = generate_cxr(np.random.default_rng(0), 128, concepts=["nodule"])
        >>> sample["image"].shape, sample["concepts"]["nodule"], sample["boxes"][0][0]
        ((128, 128), 1, 'nodule')
    """
    size = _check_size(size)
    chosen = _check_concepts(concepts)
    concept_prob = _check_fraction("concept_prob", concept_prob)
    if chosen is None:
        draws = rng.random(len(CXR_CONCEPTS)) < concept_prob
        chosen = tuple(name for name, drawn in zip(CXR_CONCEPTS, draws) if drawn)
    if lung_mask is None:
        lungs = _place_lungs(rng, size)
    else:
        lungs = np.asarray(lung_mask)
        if lungs.ndim != 2 or not lungs.any():
            raise ValueError(f"lung_mask should be a non-empty 2D mask, got shape {lungs.shape}.")
        if lungs.shape != (size, size):
            resized = Image.fromarray((lungs > 0).astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
            lungs = np.asarray(resized) > 127
        lungs = lungs > 0

    rows = np.arange(size, dtype=np.float32)[:, None]  # broadcast against cols (1, size)
    canvas = _Canvas(
        density=np.full((size, size), 0.03, dtype=np.float32),
        aeration=np.ones((size, size), dtype=np.float32),
        texture=np.ones((size, size), dtype=np.float32),
        lungs=list(_split_lungs(lungs)),
        heart=np.zeros((size, size), dtype=bool),
        free=np.ones((size, size), dtype=bool),
        mm=FIELD_OF_VIEW_MM / size,
        rows=rows,
        cols=rows.T,
    )
    spine, diaphragm = _body(rng, canvas, size)
    _heart(rng, canvas, spine, diaphragm, "cardiomegaly" in chosen)
    _spine_and_bones(rng, canvas, spine, size)
    vessels = _vessels(rng, canvas, size)

    masks: dict[str, np.ndarray] = {}
    for name, draw in _DRAWERS.items():
        if name in chosen:
            region = draw(rng, canvas)
            if region is not None and region.sum() >= MIN_REGION_PIXELS:
                masks[name] = region
    image = _compose(rng, canvas, vessels, size)
    present = {name: int(name in masks) for name in CXR_CONCEPTS}
    boxes = [(name, *_bbox(masks[name])) for name in CXR_CONCEPTS if name in masks]
    return {
        "image": image,
        "concepts": present,
        "diseases": diseases_from_concepts(present, rng),
        "masks": {name: masks[name] for name in CXR_CONCEPTS if name in masks},
        "boxes": boxes,
        "lung_mask": canvas.lung,
        "heart_mask": canvas.heart,
    }


def _compose(rng: np.random.Generator, canvas: _Canvas, vessels: np.ndarray, size: int) -> np.ndarray:
    """Lungs subtract air from the body; vessel markings, smooth variation, exposure and noise finish the image."""
    lungs = (canvas.lungs[0] | canvas.lungs[1]) & ~canvas.heart
    # aerated lung is darkest in its thick middle; blurring after the product keeps lesion edges free of dark rims
    depth = ndimage.distance_transform_edt(lungs)
    depth = np.sqrt(np.clip(depth / max(float(depth.max()), 1.0), 0.0, 1.0))
    air = _soft(lungs * (0.65 + 0.35 * depth) * canvas.aeration, 1.5 / canvas.mm)
    markings = _soft(lungs * canvas.texture * canvas.aeration, 1.0 / canvas.mm) * vessels
    density = canvas.density - rng.uniform(0.3, 0.38) * air + markings
    density += smooth_random_field(rng, (size, size), 4, rng.uniform(0.015, 0.03)).astype(np.float32)
    gain, gamma = rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.15)
    image = np.clip(density * gain, 0.0, 1.0) ** gamma
    image += rng.normal(0.0, rng.uniform(0.006, 0.015), size=(size, size)).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


# -------------------------------------------------------------------------------------------------------- data set
def _check_generator_arguments(num_images, size, seed, split, concept_prob, write_dicom_fraction) -> None:
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images should be a positive integer, got {num_images}.")
    _check_size(size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed should be a non-negative integer, got {seed}.")
    if len(split) != 3 or min(split) < 0 or not np.isclose(sum(split), 1.0):
        raise ValueError(f"split should be 3 non-negative fractions summing to 1, got {split}.")
    _check_fraction("concept_prob", concept_prob)
    _check_fraction("write_dicom_fraction", write_dicom_fraction)


def _write_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _write_dicom(image: np.ndarray, path: Path, monochrome1: bool, uid_seed: str) -> None:
    """12-bit DX image with a rescale slope of 0.5; MONOCHROME1 files store inverted values."""
    modality_values = np.rint(image.astype(np.float64) * 2047.0)  # "dense is bright" in modality units
    slope = 0.5
    stored = np.rint(modality_values / slope).astype(np.uint16)  # 0..4094
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.Modality = "DX"
    ds.PatientID = uid_seed
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, 0.0
    spacing = FIELD_OF_VIEW_MM / image.shape[0]
    ds.ImagerPixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def generate_synthetic_cxr(
    out_dir: str | Path,
    num_images: int = 200,
    size: int = 256,
    seed: int = 0,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    concept_prob: float = 0.3,
    write_dicom_fraction: float = 0.0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic chest radiograph data set for concept classification and lesion detection.

    Writes ``images/cxr_XXXX.png`` (8-bit greyscale) -- or, for about ``write_dicom_fraction`` of the images,
    ``images/cxr_XXXX.dcm`` (DX, 12 bits stored, RescaleSlope 0.5, MONOCHROME1 or MONOCHROME2 at random, read back
    "dense is bright" by :func:`common.data.dicom.read_dicom`) -- ``masks/cxr_XXXX_<concept>.png`` (0/255) for the
    concepts drawn, and ``datalist.json``::

        {"name": "synthetic_cxr", "concepts": [...], "diseases": [...], "lesion_classes": [...],
         "pixel_spacing_mm": 1.484375, "seed": 0,
         "training": [{"image": "images/cxr_0000.png", "image_size": [256, 256],
                       "concepts": [0/1 per concept], "diseases": [0/1 per disease],
                       "boxes": [[class_index, x0, y0, x1, y1], ...],
                       "concept_masks": {"nodule": "masks/cxr_0000_nodule.png"}}, ...],
         "validation": [...], "test": [...]}

    Paths are relative to ``out_dir``; ``class_index`` indexes ``lesion_classes`` and boxes are in pixels as
    described in the module docstring. Images are split in index order (they are independent draws): validation
    and test take ``round(num_images * fraction)`` each and training the rest. Each image has its own seed spawned
    from ``seed``, so the output is the same for the same arguments.

    Args:
        out_dir: output folder, created if missing.
        num_images: number of images, >= 1. Default 200.
        size: image side in pixels, >= 64. Default 256.
        seed: non-negative seed. Default 0.
        split: training, validation and test fractions summing to 1. Default ``(0.7, 0.15, 0.15)``.
        concept_prob: probability of each concept per image, in [0, 1]. Default 0.3.
        write_dicom_fraction: probability that an image is written as DICOM, in [0, 1]. Default 0.0.
        overwrite: replace an existing ``datalist.json``; otherwise raise. Default False.

    Returns:
        Path of ``datalist.json``.

    Raises:
        FileExistsError: ``out_dir/datalist.json`` exists and ``overwrite`` is False.
        ValueError: an argument is out of range.
    """
    _check_generator_arguments(num_images, size, seed, split, concept_prob, write_dicom_fraction)
    out_dir = Path(out_dir)
    datalist_path = datalist_target(out_dir, overwrite)

    items = []
    for index, child in enumerate(np.random.SeedSequence(int(seed)).spawn(int(num_images))):
        image_seed, file_seed = child.spawn(2)  # the file format never changes the image
        sample = generate_cxr(np.random.default_rng(image_seed), size, concept_prob=concept_prob)
        file_rng = np.random.default_rng(file_seed)
        as_dicom, monochrome1 = file_rng.random() < write_dicom_fraction, file_rng.random() < 0.5
        stem = f"cxr_{index:04d}"
        if as_dicom:
            image_name = f"images/{stem}.dcm"
            _write_dicom(sample["image"], out_dir / image_name, monochrome1, f"synthetic-cxr-{seed}-{index}")
        else:
            image_name = f"images/{stem}.png"
            _write_png(np.rint(sample["image"] * 255.0).astype(np.uint8), out_dir / image_name)
        concept_masks = {}
        for name, mask in sample["masks"].items():
            concept_masks[name] = f"masks/{stem}_{name}.png"
            _write_png(mask.astype(np.uint8) * 255, out_dir / concept_masks[name])
        items.append({
            "image": image_name,
            "image_size": [size, size],
            "concepts": [sample["concepts"][name] for name in CXR_CONCEPTS],
            "diseases": [sample["diseases"][name] for name in CXR_DISEASES],
            "boxes": [[LESION_CLASSES.index(name), *coords] for name, *coords in sample["boxes"]
                      if name in LESION_CLASSES],
            "concept_masks": concept_masks,
        })

    header = {
        "name": "synthetic_cxr",
        "description": "Synthetic PA chest radiographs (dense is bright) with localised concepts, their masks and "
        "boxes, and diseases derived from the concepts by noisy rules; made by common.data.synthetic_cxr.",
        "seed": int(seed),
        "pixel_spacing_mm": FIELD_OF_VIEW_MM / size,
        "concepts": list(CXR_CONCEPTS),
        "diseases": list(CXR_DISEASES),
        "lesion_classes": list(LESION_CLASSES),
    }
    return write_split_datalist(datalist_path, header, items, split)
