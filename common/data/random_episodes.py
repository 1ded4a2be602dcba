"""Domain-randomised in-context episodes: random anatomies, random appearances, random tasks.

An episode is drawn from nothing but a seed, in three steps that follow SynthSeg (label map to image synthesis;
Billot et al., Medical Image Analysis 2023) and UniverSeg (synthetic tasks; Butoi et al., ICCV 2023):

1. **Anatomy** (:func:`random_anatomy`): a label map on a canvas a quarter larger than the views, made of a smooth
   random partition of space (argmax of smooth noise fields, optionally inside a body surrounded by background)
   overlaid with random structures, each with its own label: smooth blobs, large organs split into touching parts,
   nested structures (a folded shell around a core, like cortical gray matter around white matter), branching
   tubes, curved plates, clusters of small nodules, and folded tissue ribbons around a core with islands of the
   ribbon's tissue inside it (one class in several disjoint places, like gray matter around and within white
   matter). Boundaries and intensities, not silhouettes, carry the classes.
2. **Appearance** (:func:`random_appearance`): per-label mean intensities and texture drawn per episode, then per
   view a blur, a resolution loss (down- and up-sampling, often anisotropic, like thick slices), a multiplicative
   bias field, percentile normalisation to [0, 1], gamma, noise and, now and then, an inverted contrast; or, in a
   chosen share of episodes, a CT-like appearance: most labels within a narrow band of intensities under one fixed
   window, so that a class is told apart from its neighbours by a few hundredths of the window.
3. **Views** (:func:`render_view`): the references and the query show the same anatomy under the same appearance
   (means perturbed slightly per view), each under its own smooth deformation, small affine (rotation, scaling,
   shift) and crop; the classes are labels (or a nested structure as a whole) that every view shows.

Episodes share nothing, so no class means anything beyond its episode: the network can only solve them by reading
the references. Episode ``i`` of seed ``s`` is the same on any machine and with any number of data-loader workers.

Generation speed, measured on one core of an AMD EPYC VM (``torch.set_num_threads(1)``; episodes 0-29 of
``RandomEpisodeDataset(seed=0)``: 3 classes, 1-3 references): 8.8 episodes/s at 48^3, 3.4 episodes/s at 64^3, so a
data-loader worker or two keep pace with a CPU training step and a few more with a GPU one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.interpolate import CubicSpline
from torch.utils.data import Dataset

__all__ = [
    "STRUCTURE_WEIGHTS",
    "TISSUE_STRUCTURE_WEIGHTS",
    "Appearance",
    "MixedEpisodeDataset",
    "RandomAnatomy",
    "RandomEpisodeDataset",
    "random_anatomy",
    "random_appearance",
    "random_episode",
    "render_view",
]

CANVAS_MARGIN = 1.25  # canvas / view size: room for crops and deformations
MIN_CLASS_VOXELS = 8  # a class must show this many voxels in the query and in every reference
MAX_ATTEMPTS = 10  # fresh anatomies drawn when a draw leaves no class shown in every view
STRUCTURE_WEIGHTS = {"blob": 3, "organs": 2, "nested": 3, "tubes": 2, "plate": 1, "nodules": 2}
# with the folded tissue ribbons (brain-like) drawn as often as nested structures
TISSUE_STRUCTURE_WEIGHTS = {"blob": 3, "organs": 2, "nested": 3, "tissues": 3, "tubes": 2, "plate": 1, "nodules": 2}
MAX_ROTATION_DEG = 15.0
SCALE_RANGE = (0.88, 1.12)
MAX_ELASTIC_STD = 0.04  # of the view size, in voxels once scaled


@functools.lru_cache(maxsize=128)
def _spline_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` cubic-spline interpolation weights from ``n_in`` control points to ``n_out`` samples."""
    return CubicSpline(np.arange(n_in), np.eye(n_in))(np.linspace(0.0, n_in - 1.0, n_out)).astype(np.float32)


def _smooth_fields(rng: np.random.Generator, count: int, shape: Sequence[int], points: Sequence[int]) -> np.ndarray:
    """``(count, *shape)`` float32 smooth random fields, each of unit standard deviation (separable splines)."""
    fields = rng.standard_normal((count, *points)).astype(np.float32)
    for axis, (n_in, n_out) in enumerate(zip(points, shape)):
        fields = np.moveaxis(np.tensordot(_spline_weights(int(n_in), int(n_out)), fields, axes=(1, axis + 1)), 0,
                             axis + 1)
    return fields / np.maximum(fields.reshape(count, -1).std(1), 1e-6).reshape((count,) + (1,) * len(shape))


def _rotation(rng: np.random.Generator, max_deg: float = 180.0) -> np.ndarray:
    """Rotation about a random axis by at most ``max_deg`` degrees (Rodrigues)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


@dataclass
class RandomAnatomy:
    """A random label map and its structures.

    Attributes:
        label: ``(X, Y, Z)`` int16 label map; 0 is background (outside the body, or nothing), 1..``num_labels``
            are structures.
        num_labels: the largest label value.
        groups: label sets that form one structure together (a nested shell and its core, an organ's parts); a
            group can be a class of its own, as a whole.
    """

    label: np.ndarray
    num_labels: int
    groups: list[tuple[int, ...]]


class _Painter:
    """Paints structures into a label map, each call with fresh label values; later structures cover earlier ones."""

    def __init__(self, rng: np.random.Generator, label: np.ndarray, inside: np.ndarray | None) -> None:
        self.rng, self.label, self.inside = rng, label, inside
        self.shape = np.asarray(label.shape)
        self.next_label = int(label.max()) + 1
        self.groups: list[tuple[int, ...]] = []

    def new_labels(self, n: int) -> list[int]:
        values = list(range(self.next_label, self.next_label + n))
        self.next_label += n
        return values

    def centre(self, radius: float) -> np.ndarray:
        """A random centre, inside the body when there is one, at least ``radius / 2`` from the canvas edge."""
        low, high = np.minimum(0.5 * radius, 0.4 * self.shape), np.maximum(self.shape - 0.5 * radius, 0.6 * self.shape)
        for _ in range(20):
            c = self.rng.uniform(low, high)
            if self.inside is None or self.inside[tuple(c.astype(int))]:
                break
        return c

    def box(self, centre: np.ndarray, radius: float) -> tuple[tuple[slice, ...], list[np.ndarray]]:
        """Bounding box of a ball, clipped to the canvas, and its voxel offsets from ``centre`` (broadcastable)."""
        lo = np.clip(np.floor(centre - radius), 0, self.shape).astype(int)
        hi = np.clip(np.ceil(centre + radius) + 1, 0, self.shape).astype(int)
        offsets = [(np.arange(a, b, dtype=np.float32) - c).reshape([-1 if i == axis else 1 for i in range(3)])
                   for axis, (a, b, c) in enumerate(zip(lo, hi, centre))]
        return tuple(slice(a, b) for a, b in zip(lo, hi)), offsets

    def level_set(self, radius: float, wobble: float, folds: int) -> tuple[tuple[slice, ...], np.ndarray]:
        """``1 - rho + wobble * noise`` in the box of a randomly rotated ellipsoid; > 0 inside the shape."""
        centre = self.centre(radius)
        box, (dx, dy, dz) = self.box(centre, radius * (1.0 + wobble))
        axes = radius * self.rng.uniform(0.55, 1.0, size=3)
        rot = _rotation(self.rng)
        rho2 = sum(((rot[0, i] * dx + rot[1, i] * dy + rot[2, i] * dz) / axes[i]) ** 2 for i in range(3))
        field = 1.0 - np.sqrt(rho2)
        shape = field.shape
        if wobble > 0 and min(shape) >= 2:
            points = [max(2, min(n, folds)) for n in shape]
            field = field + wobble * _smooth_fields(self.rng, 1, shape, points)[0]
        return box, field

    def paint(self, box: tuple[slice, ...], mask: np.ndarray, value: int) -> None:
        if self.inside is not None:
            mask = mask & self.inside[box]
        self.label[box][mask] = value

    def blob(self, size: float) -> None:
        box, f = self.level_set(size * self.rng.uniform(0.06, 0.18), self.rng.uniform(0.1, 0.5), 4)
        self.paint(box, f > 0, self.new_labels(1)[0])

    def organs(self, size: float) -> None:
        """A large region split into 2-4 touching parts by the argmax of smooth fields."""
        box, f = self.level_set(size * self.rng.uniform(0.18, 0.32), self.rng.uniform(0.05, 0.25), 3)
        n = int(self.rng.integers(2, 5))
        parts = np.argmax(_smooth_fields(self.rng, n, f.shape, [3, 3, 3]), axis=0)
        values = self.new_labels(n)
        for j, v in enumerate(values):
            self.paint(box, (f > 0) & (parts == j), v)
        self.groups.append(tuple(values))

    def nested(self, size: float) -> None:
        """A shell around a core (sometimes a second shell around the first), folded by higher-frequency noise."""
        box, f = self.level_set(size * self.rng.uniform(0.12, 0.3), self.rng.uniform(0.1, 0.45),
                                int(self.rng.integers(3, 9)))
        layers = int(self.rng.integers(2, 4))
        cuts = np.sort(self.rng.uniform(0.12, 0.45, size=layers - 1)).cumsum()
        values = self.new_labels(layers)
        for v, cut in zip(values, [0.0, *cuts]):
            self.paint(box, f > cut, v)
        self.groups.append(tuple(values))

    def tissues(self, size: float) -> None:
        """A large, finely folded ribbon of one tissue around a core of another, with islands of the ribbon's tissue
        inside the core (like cortical and deep gray matter around white matter).

        The ribbon's label is one class in several disjoint places, and the structure as a whole is a class too, so
        only the references' intensities tell the two tissues apart from each other and from the whole.
        """
        box, f = self.level_set(size * self.rng.uniform(0.25, 0.45), self.rng.uniform(0.25, 0.6),
                                int(self.rng.integers(6, 13)))
        ribbon, core = self.new_labels(2)
        cut = self.rng.uniform(0.08, 0.25)
        self.paint(box, f > 0, ribbon)
        self.paint(box, f > cut, core)
        inner = np.argwhere(f > cut + 0.15)
        for _ in range(int(self.rng.integers(0, 5)) if len(inner) else 0):
            c = inner[self.rng.integers(len(inner))].astype(np.float32)
            radius = self.rng.uniform(0.03, 0.08) * size
            lo = np.maximum(np.floor(c - radius), 0).astype(int)
            hi = np.minimum(np.ceil(c + radius) + 1, f.shape).astype(int)
            sub = tuple(slice(a, b) for a, b in zip(lo, hi))
            d2 = sum(((np.arange(a, b, dtype=np.float32) - x) * self.rng.uniform(0.7, 1.3)).reshape(
                [-1 if i == axis else 1 for i in range(3)]) ** 2 for axis, (a, b, x) in enumerate(zip(lo, hi, c)))
            island = np.zeros(f.shape, dtype=bool)
            island[sub] = d2 <= radius**2
            self.paint(box, island & (f > cut), ribbon)
        self.groups.append((ribbon, core))

    def tubes(self, size: float) -> None:
        """A branching tube tree: a persistent random walk that splits now and then, radius shrinking per branch."""
        value = self.new_labels(1)[0]
        stack = [(self.centre(0.3 * size), _unit(self.rng.standard_normal(3)), self.rng.uniform(0.8, 2.2))]
        segments = 0
        while stack and segments < 60:
            point, direction, radius = stack.pop()
            for _ in range(int(self.rng.integers(4, 12))):
                direction = _unit(direction + 0.35 * self.rng.standard_normal(3))
                step = direction * self.rng.uniform(2.0, 4.0)
                self._segment(point, point + step, radius, value)
                point, segments = point + step, segments + 1
                if np.any(point < 0) or np.any(point >= self.shape):
                    break
                if self.rng.random() < 0.15 and radius > 0.7:
                    stack.append((point.copy(), _unit(direction + self.rng.standard_normal(3)), 0.75 * radius))
                    radius *= 0.85

    def _segment(self, a: np.ndarray, b: np.ndarray, radius: float, value: int) -> None:
        box, (dx, dy, dz) = self.box(0.5 * (a + b), 0.5 * float(np.linalg.norm(b - a)) + radius + 1.0)
        axis = b - a
        length2 = max(float(axis @ axis), 1e-6)
        # offsets are from the segment's midpoint; t in [-0.5, 0.5] along it
        t = np.clip((dx * axis[0] + dy * axis[1] + dz * axis[2]) / length2, -0.5, 0.5)
        dist2 = (dx - t * axis[0]) ** 2 + (dy - t * axis[1]) ** 2 + (dz - t * axis[2]) ** 2
        self.paint(box, dist2 <= radius**2, value)

    def plate(self, size: float) -> None:
        """A thin curved slab: a plane displaced by a smooth field, limited to a disc."""
        radius = size * self.rng.uniform(0.12, 0.3)
        centre = self.centre(radius)
        box, (dx, dy, dz) = self.box(centre, radius)
        normal = _unit(self.rng.standard_normal(3))
        height = dx * normal[0] + dy * normal[1] + dz * normal[2]
        shape = np.broadcast_shapes(dx.shape, dy.shape, dz.shape)
        bend = self.rng.uniform(0.0, 0.15) * radius * _smooth_fields(self.rng, 1, shape, [3, 3, 3])[0]
        inplane2 = dx**2 + dy**2 + dz**2 - height**2
        mask = (np.abs(height + bend) <= 0.5 * self.rng.uniform(1.2, 3.5)) & (inplane2 <= radius**2)
        self.paint(box, mask, self.new_labels(1)[0])

    def nodules(self, size: float) -> None:
        """1-6 small balls sharing one label, clustered around a centre."""
        value = self.new_labels(1)[0]
        centre = self.centre(0.2 * size)
        for _ in range(int(self.rng.integers(1, 7))):
            radius = self.rng.uniform(1.0, 2.8)
            c = np.clip(centre + self.rng.normal(0.0, 0.08 * size, size=3), 0, self.shape - 1)
            box, (dx, dy, dz) = self.box(c, radius + 1.0)
            self.paint(box, dx**2 + dy**2 + dz**2 <= radius**2, value)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    kinds = set(TISSUE_STRUCTURE_WEIGHTS)
    unknown = sorted(set(weights) - kinds)
    if unknown or any(float(w) < 0 for w in weights.values()) or not any(float(w) > 0 for w in weights.values()):
        raise ValueError(f"structure_weights should map kinds of {sorted(kinds)} to non-negative weights, not all 0; "
                         f"got {dict(weights)}.")
    return {k: float(w) for k, w in weights.items()}


def random_anatomy(
    rng: np.random.Generator, shape: Sequence[int], max_structures: int = 16,
    structure_weights: Mapping[str, float] | None = None,
) -> RandomAnatomy:
    """A random label map with many structures; see the module docstring.

    Args:
        rng: random generator; the same state gives the same anatomy.
        shape: ``(X, Y, Z)`` canvas voxels, each >= 16.
        max_structures: most structures overlaid on the background partition (>= 1); at least a third of it
            are drawn. Default 16.
        structure_weights: relative frequency of each kind of structure (``blob``, ``organs``, ``nested``,
            ``tissues``, ``tubes``, ``plate``, ``nodules``); kinds left out or at 0 are not drawn. Default
            :data:`STRUCTURE_WEIGHTS` (no ``tissues``); :data:`TISSUE_STRUCTURE_WEIGHTS` adds them.

    Returns:
        :class:`RandomAnatomy` with labels 0 (background) to ``num_labels``; a label may have been covered entirely
        by later structures.

    Example:
        >>> a = random_anatomy(np.random.default_rng(0), (40, 40, 40))
        >>> a.label.shape, a.label.dtype, a.num_labels > 3
        ((40, 40, 40), dtype('int16'), True)
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16 or max_structures < 1:
        raise ValueError(f"shape should be 3 sizes >= 16 and max_structures >= 1, got {shape}, {max_structures}.")
    size = float(np.mean(shape))
    regions = int(rng.integers(2, 7))
    points = [int(rng.integers(2, 6))] * 3
    label = (np.argmax(_smooth_fields(rng, regions, shape, points), axis=0) + 1).astype(np.int16)
    inside = None
    if rng.random() < 0.6:  # a body in background, as in most scans; otherwise the view lies inside tissue
        body = 1.0 - np.sqrt(sum(((np.arange(n, dtype=np.float32) - 0.5 * (n - 1)) / (0.5 * n * rng.uniform(
            0.75, 1.0))).reshape([-1 if i == a else 1 for i in range(3)]) ** 2 for a, n in enumerate(shape)))
        inside = body + 0.15 * _smooth_fields(rng, 1, shape, [4, 4, 4])[0] > 0
        label[~inside] = 0
    painter = _Painter(rng, label, inside)
    table = STRUCTURE_WEIGHTS if structure_weights is None else _check_weights(structure_weights)
    # kinds at weight 0 are left out of the draw, so a table without them draws exactly as one that never had them
    kinds = [k for k, w in table.items() if w > 0]
    weights = np.array([float(table[k]) for k in kinds])
    count = int(rng.integers((max_structures + 2) // 3, max_structures + 1))
    for kind in rng.choice(kinds, size=count, p=weights / weights.sum()):
        getattr(painter, str(kind))(size)
    return RandomAnatomy(label=label, num_labels=painter.next_label - 1, groups=painter.groups)


@dataclass
class Appearance:
    """How an episode's anatomy looks: one draw per episode, shared by its references and query.

    Attributes:
        means: ``(L + 1,)`` mean intensity per label (arbitrary units, normalised per view later).
        noise: ``(L + 1,)`` per-voxel Gaussian spread per label before blurring (fine texture).
        texture: ``(L + 1,)`` amplitude per label of a smooth random texture field.
        texture_points: control points per axis of the texture field (its coarseness).
        blur: Gaussian blur sigma in voxels.
        resolution: ``(3,)`` down-sampling factors (>= 1), 1 where the axis keeps its resolution.
        bias: standard deviation of the log bias field.
        gamma: exponent applied after normalisation.
        noise_std: additive Gaussian noise after normalisation.
        invert: whether the contrast is inverted (``1 - x``).
        jitter: per-view standard deviation of the label means, as a fraction of their range.
        window: ``(low, high)`` intensity window shared by every view of the episode, CT-like (fixed, so a label
            keeps its intensity from view to view); None for the per-view 0.5-99.5 percentile window of MR.
    """

    means: np.ndarray
    noise: np.ndarray
    texture: np.ndarray
    texture_points: int
    blur: float
    resolution: np.ndarray
    bias: float
    gamma: float
    noise_std: float
    invert: bool
    jitter: float
    window: tuple[float, float] | None = None


def random_appearance(rng: np.random.Generator, num_labels: int, low_contrast_fraction: float = 0.0) -> Appearance:
    """A random appearance model for labels ``0..num_labels`` (see :class:`Appearance`).

    Label means are uniform in [0, 1] (label 0, background, is dark in most episodes, like air); spreads and
    textures are drawn per label, so two labels may look alike and only their boundary tells them apart. With
    probability ``low_contrast_fraction`` the appearance is CT-like instead (:func:`_low_contrast_appearance`).
    """
    # drawn only when asked for, so that the default consumes the random state as it always did
    if low_contrast_fraction > 0 and rng.random() < low_contrast_fraction:
        return _low_contrast_appearance(rng, num_labels)
    n = num_labels + 1
    means = rng.uniform(0.0, 1.0, size=n)
    if rng.random() < 0.7:
        means[0] = rng.uniform(0.0, 0.05)
    resolution = _random_resolution(rng)
    return Appearance(
        means=means,
        noise=rng.uniform(0.0, 0.08, size=n) * (rng.random(n) < 0.7),
        texture=rng.uniform(0.0, 0.12, size=n) * (rng.random(n) < 0.5),
        texture_points=int(rng.integers(4, 12)),
        blur=float(rng.uniform(0.0, 1.2)),
        resolution=resolution,
        bias=float(rng.uniform(0.0, 0.3)),
        gamma=float(np.exp(rng.normal(0.0, 0.3))),
        noise_std=float(rng.uniform(0.0, 0.05)),
        invert=bool(rng.random() < 0.15),
        jitter=float(rng.uniform(0.0, 0.03)),
    )


def _random_resolution(rng: np.random.Generator) -> np.ndarray:
    resolution = np.ones(3)
    if rng.random() < 0.5:
        resolution = rng.uniform(1.0, 1.6, size=3)
        if rng.random() < 0.6:  # thick slices along one axis
            resolution[rng.integers(0, 3)] = rng.uniform(1.5, 4.0)
    return resolution


def _low_contrast_appearance(rng: np.random.Generator, num_labels: int) -> Appearance:
    """A CT-like appearance: most labels inside a narrow band of intensities, a few far outside it, one fixed window.

    In a windowed CT the soft tissues lie within a few hundredths of the window of each other while air, lung and
    bone sit far off (fat at 0.54, soft tissue at 0.67 and a contrast-enhanced structure at 0.72 under the bundles'
    default window), so the class is the one that is exactly as bright as the reference's, not the brightest thing
    in the view. Labels keep their intensity from view to view (one window, no gamma, no inversion) and the noise
    and texture are scaled to the band, as a scanner's noise is small against the window.
    """
    n = num_labels + 1
    width = float(rng.uniform(0.04, 0.3))
    means = rng.uniform(0.3, 0.8) + width * rng.uniform(-0.5, 0.5, size=n)
    outliers = rng.random(n) < 0.15  # air, lung, bone, contrast: far from the band
    means[outliers] = rng.uniform(0.0, 1.0, size=int(outliers.sum()))
    if rng.random() < 0.7:
        means[0] = rng.uniform(0.0, 0.05)
    low, high = float(means.min()), float(means.max())
    margin = 0.05 * max(high - low, 1e-3)
    return Appearance(
        means=means,
        noise=width * rng.uniform(0.0, 0.3, size=n) * (rng.random(n) < 0.7),
        texture=width * rng.uniform(0.0, 0.3, size=n) * (rng.random(n) < 0.5),
        texture_points=int(rng.integers(4, 12)),
        blur=float(rng.uniform(0.0, 1.0)),
        resolution=_random_resolution(rng),
        bias=float(rng.uniform(0.0, 0.03)),
        gamma=1.0,
        noise_std=float(rng.uniform(0.0, 0.1)) * width,
        invert=False,
        jitter=0.0,
        window=(low - margin, high + margin),
    )


def _sampling_grid(rng: np.random.Generator, canvas: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """``(1, *size, 3)`` grid_sample coordinates: a random affine, elastic field and crop of the canvas."""
    canvas_arr, size_arr = np.asarray(canvas, dtype=np.float64), np.asarray(size, dtype=np.float64)
    matrix = _rotation(rng, MAX_ROTATION_DEG) * rng.uniform(*SCALE_RANGE, size=3)[None, :]
    shift = rng.uniform(-1.0, 1.0, size=3) * (0.5 * (canvas_arr - size_arr) + 0.06 * size_arr)
    axes = [np.arange(n, dtype=np.float32) - 0.5 * (n - 1) for n in size]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, *size), offsets from the view centre
    coords = np.einsum("ij,j...->i...", matrix.astype(np.float32), grid)
    elastic = rng.uniform(0.0, MAX_ELASTIC_STD) * float(size_arr.mean())
    points = [int(rng.integers(3, 6))] * 3
    coords += elastic * _smooth_fields(rng, 3, size, points)
    coords += (0.5 * (canvas_arr - 1) + shift).astype(np.float32).reshape(3, 1, 1, 1)
    normalised = 2.0 * coords / (canvas_arr - 1).reshape(3, 1, 1, 1).astype(np.float32) - 1.0
    # grid_sample reads (x, y, z) = (last, middle, first) input axis
    return torch.from_numpy(np.ascontiguousarray(normalised[::-1].transpose(1, 2, 3, 0)))[None]


def _normalise(image: np.ndarray) -> np.ndarray:
    """0.5-99.5 percentile window to [0, 1], as the MR preprocessing of the bundles does."""
    lo, hi = np.percentile(image[::2, ::2, ::2], [0.5, 99.5])
    return np.clip((image - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)


def render_view(
    rng: np.random.Generator, anatomy: RandomAnatomy, appearance: Appearance, size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """One view of an anatomy: independent deformation, affine and crop; image synthesised from the label map.

    Args:
        rng: random generator of this view.
        anatomy: the episode's anatomy (its canvas is larger than ``size``).
        appearance: the episode's appearance model.
        size: ``(X, Y, Z)`` voxels of the view.

    Returns:
        ``(image, label)``: float32 image in [0, 1] and int64 label map, both of ``size``.
    """
    size = tuple(int(n) for n in size)
    grid = _sampling_grid(rng, anatomy.label.shape, size)
    source = torch.from_numpy(anatomy.label.astype(np.float32))[None, None]
    label = F.grid_sample(source, grid, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0]
    label = label.numpy().astype(np.int64)
    spread = float(np.ptp(appearance.means)) or 1.0
    means = appearance.means + rng.normal(0.0, appearance.jitter * spread, size=appearance.means.shape)
    image = means[label] + appearance.noise[label] * rng.standard_normal(size)
    if appearance.texture.any():
        points = [min(appearance.texture_points, n) for n in size]
        image += appearance.texture[label] * _smooth_fields(rng, 1, size, points)[0]
    blur = appearance.blur * rng.uniform(0.85, 1.15)
    if blur > 0.3:
        image = ndimage.gaussian_filter(image, blur, mode="nearest")
    image_t = torch.from_numpy(image.astype(np.float32))[None, None]
    if np.any(appearance.resolution > 1.0):
        low = [max(4, int(round(n / f))) for n, f in zip(size, appearance.resolution)]
        image_t = F.interpolate(F.interpolate(image_t, size=low, mode="area"), size=size, mode="trilinear")
    image = image_t[0, 0].numpy()
    image = image * np.exp(appearance.bias * _smooth_fields(rng, 1, size, [3, 3, 3])[0])
    if appearance.window is None:
        image = _normalise(image) ** (appearance.gamma * np.exp(rng.normal(0.0, 0.05)))
    else:
        low, high = appearance.window
        image = np.clip((image - low) / (high - low), 0.0, 1.0)
    image = np.clip(image + rng.normal(0.0, appearance.noise_std, size=size), 0.0, 1.0)
    if appearance.invert:
        image = 1.0 - image
    return image.astype(np.float32), label


def _candidates(anatomy: RandomAnatomy) -> list[tuple[int, ...]]:
    """Possible classes: every label, and every group (a structure as a whole)."""
    return [(v,) for v in range(1, anatomy.num_labels + 1)] + list(anatomy.groups)


def _draw_classes(
    rng: np.random.Generator, labels: list[np.ndarray], anatomy: RandomAnatomy, max_classes: int,
    group_fraction: float = 0.0,
) -> list[tuple[int, ...]]:
    """Up to ``max_classes`` classes that show at least ``MIN_CLASS_VOXELS`` voxels in every view; with probability
    ``group_fraction`` they start with the parts of one multi-part structure."""
    counts = np.stack([np.bincount(lab.ravel(), minlength=anatomy.num_labels + 1) for lab in labels])
    shown = [c for c in _candidates(anatomy) if np.all(counts[:, list(c)].sum(1) >= MIN_CLASS_VOXELS)]
    if not shown:
        return []
    k = max_classes if rng.random() < 0.6 else int(rng.integers(1, max_classes + 1))
    if group_fraction <= 0:  # the plain draw, random state consumed as it always was
        weights = np.array([1.0 if len(c) == 1 else 0.5 for c in shown])
        chosen = rng.choice(len(shown), size=min(k, len(shown)), replace=False, p=weights / weights.sum())
        return [shown[i] for i in chosen]
    picked: list[tuple[int, ...]] = []
    groups = [c for c in shown if len(c) > 1]
    if groups and rng.random() < group_fraction:
        # the parts of one structure side by side, and sometimes the structure as a whole: classes that share a
        # region and differ only inside it, the hardest case (gray and white matter within a brain)
        group = groups[rng.integers(len(groups))]
        parts = [(v,) for v in group if (v,) in shown]
        picked = [parts[i] for i in rng.permutation(len(parts))[:k]]
        if len(picked) < k and rng.random() < 0.5:
            picked.append(group)
    rest = [c for c in shown if c not in picked]
    if len(picked) < k and rest:
        weights = np.array([1.0 if len(c) == 1 else 0.5 for c in rest])
        more = rng.choice(len(rest), size=min(k - len(picked), len(rest)), replace=False, p=weights / weights.sum())
        picked += [rest[i] for i in more]
    return [picked[i] for i in rng.permutation(len(picked))]


def random_episode(
    rng: np.random.Generator,
    image_size: Sequence[int] = (48, 48, 48),
    classes_per_episode: int = 3,
    references_per_episode: int = 3,
    min_references: int = 1,
    ignore_value: float = -1.0,
    max_structures: int = 16,
    structure_weights: Mapping[str, float] | None = None,
    group_fraction: float = 0.0,
    low_contrast_fraction: float = 0.0,
) -> dict[str, torch.Tensor]:
    """One domain-randomised episode in the layout of :class:`common.data.EpisodeDataset`.

    Draws an anatomy, an appearance, between ``min_references`` and ``references_per_episode`` references plus a
    query (independent views), and 1 to ``classes_per_episode`` classes shown in every view.

    Args:
        rng: random generator; the same state gives the same episode.
        image_size: ``(X, Y, Z)`` of every view. Default ``(48, 48, 48)``.
        classes_per_episode: K, class channels. Default 3.
        references_per_episode: R, reference slots; slots beyond the drawn count hold a zero image and empty masks,
            which IRIS leaves out of its reference average. Default 3.
        min_references: fewest references drawn, in ``[1, R]``. Default 1.
        ignore_value: fill of the query's unused class channels. Default -1.
        max_structures, structure_weights: passed to :func:`random_anatomy`. Defaults 16 and
            :data:`STRUCTURE_WEIGHTS`.
        group_fraction: share of episodes whose classes start with the parts of one multi-part structure (a
            shell and its core, a tissue ribbon and its core, an organ's parts), sometimes with the whole as a
            further class. Default 0 (classes drawn among all shown, parts and wholes alike).
        low_contrast_fraction: share of episodes with a CT-like appearance (:func:`random_appearance`): most labels
            within a narrow band of intensities under one fixed window. Default 0.

    Returns:
        ``image (1, *S)``, ``label (K, *S)`` (binary; unused channels ``ignore_value``), ``ref_image (R, 1, *S)``,
        ``ref_label (R, K, *S)`` (binary, zeros where unused) and ``class_ids (K,)``, all -1: these classes belong
        to no vocabulary, so a class memory bank leaves them out.
    """
    size = tuple(int(n) for n in image_size)
    canvas = tuple(int(np.ceil(CANVAS_MARGIN * n)) for n in size)
    num_refs = int(rng.integers(min_references, references_per_episode + 1))
    for _ in range(MAX_ATTEMPTS):
        anatomy = random_anatomy(rng, canvas, max_structures, structure_weights)
        appearance = random_appearance(rng, anatomy.num_labels, low_contrast_fraction)
        views = [render_view(rng, anatomy, appearance, size) for _ in range(num_refs + 1)]
        classes = _draw_classes(rng, [lab for _, lab in views], anatomy, classes_per_episode, group_fraction)
        if classes:
            break
    else:
        raise RuntimeError(f"no class shown in every view after {MAX_ATTEMPTS} anatomies; enlarge image_size.")
    masks = torch.zeros(num_refs + 1, classes_per_episode, *size)
    for k, values in enumerate(classes):
        for j, (_, lab) in enumerate(views):
            masks[j, k] = torch.from_numpy(np.isin(lab, values))
    images = torch.from_numpy(np.stack([img for img, _ in views]))[:, None]
    label = masks[-1].clone()
    label[len(classes):] = ignore_value
    ref_image = torch.zeros(references_per_episode, 1, *size)
    ref_label = torch.zeros(references_per_episode, classes_per_episode, *size)
    ref_image[:num_refs], ref_label[:num_refs] = images[:-1], masks[:-1]
    return {
        "image": images[-1],
        "label": label,
        "ref_image": ref_image,
        "ref_label": ref_label,
        "class_ids": torch.full((classes_per_episode,), -1, dtype=torch.long),
    }


def _check_counts(classes_per_episode: int, references_per_episode: int, episodes_per_epoch: int) -> None:
    if classes_per_episode < 1 or references_per_episode < 1 or episodes_per_epoch < 1:
        raise ValueError(
            "classes_per_episode, references_per_episode and episodes_per_epoch should be >= 1, got "
            f"{classes_per_episode}, {references_per_episode}, {episodes_per_epoch}."
        )


class RandomEpisodeDataset(Dataset):
    """Domain-randomised episodes (:func:`random_episode`), generated on the fly, in ``EpisodeDataset``'s layout.

    Item ``index`` of epoch ``e`` is episode ``e * episodes_per_epoch + index`` of ``seed`` (:meth:`episode`),
    so episodes never repeat across epochs once :meth:`set_epoch` is called at each epoch's start (the bundles'
    ``common.handlers.DatasetEpochHandler`` does), and the same seed gives the same episodes with any number of
    data-loader workers.

    Args:
        image_size: ``(X, Y, Z)`` of every view; the network's input size. Default ``(48, 48, 48)``.
        classes_per_episode: K. Default 3.
        references_per_episode: R reference slots. Default 3.
        min_references: fewest references an episode draws, in ``[1, R]``. Default 1.
        episodes_per_epoch: length of the dataset. Default 100.
        seed: non-negative seed of the episode stream. Default 0.
        ignore_value: fill of unused query channels. Default -1.
        max_structures: most structures per anatomy. Default 16.
        structure_weights: kinds of structure and how often each is drawn (:func:`random_anatomy`). Default
            :data:`STRUCTURE_WEIGHTS`.
        group_fraction: share of episodes that set the parts of one structure side by side
            (:func:`random_episode`). Default 0.
        low_contrast_fraction: share of episodes with a CT-like, low-contrast appearance (:func:`random_episode`).
            Default 0.

    Example:
        >>> ds = RandomEpisodeDataset(image_size=(32, 32, 32), references_per_episode=2, episodes_per_epoch=4)
        >>> {k: tuple(v.shape) for k, v in ds[0].items()}["ref_label"]
        (2, 3, 32, 32, 32)
    """

    def __init__(
        self,
        image_size: Sequence[int] = (48, 48, 48),
        classes_per_episode: int = 3,
        references_per_episode: int = 3,
        min_references: int = 1,
        episodes_per_epoch: int = 100,
        seed: int = 0,
        ignore_value: float = -1.0,
        max_structures: int = 16,
        structure_weights: Mapping[str, float] | None = None,
        group_fraction: float = 0.0,
        low_contrast_fraction: float = 0.0,
    ) -> None:
        _check_counts(classes_per_episode, references_per_episode, episodes_per_epoch)
        size = tuple(int(n) for n in image_size)
        if len(size) != 3 or min(size) < 16:
            raise ValueError(f"image_size should be 3 sizes >= 16, got {image_size}.")
        if not 1 <= min_references <= references_per_episode:
            raise ValueError(f"min_references should be in [1, {references_per_episode}], got {min_references}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed should be a non-negative integer, got {seed}.")
        if max_structures < 1:
            raise ValueError(f"max_structures should be >= 1, got {max_structures}.")
        for name, value in (("group_fraction", group_fraction), ("low_contrast_fraction", low_contrast_fraction)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} should be in [0, 1], got {value}.")
        self.structure_weights = None if structure_weights is None else _check_weights(structure_weights)
        self.group_fraction = float(group_fraction)
        self.low_contrast_fraction = float(low_contrast_fraction)
        self.image_size = size
        self.classes_per_episode = classes_per_episode
        self.references_per_episode = references_per_episode
        self.min_references = min_references
        self.episodes_per_epoch = episodes_per_epoch
        self.seed = int(seed)
        self.ignore_value = ignore_value
        self.max_structures = max_structures
        self.epoch = 0

    def __len__(self) -> int:
        return self.episodes_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's episodes; call in the main process before the epoch's workers start."""
        self.epoch = int(epoch)

    def episode(self, number: int) -> dict[str, torch.Tensor]:
        """Episode ``number`` of this dataset's seed, whatever the epoch."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(number)]))
        return random_episode(
            rng, self.image_size, self.classes_per_episode, self.references_per_episode, self.min_references,
            self.ignore_value, self.max_structures, self.structure_weights, self.group_fraction,
            self.low_contrast_fraction,
        )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.episode(self.epoch * self.episodes_per_epoch + int(index))


def _pad_references(item: dict[str, torch.Tensor], references: int) -> dict[str, torch.Tensor]:
    """``item`` with reference slots added up to ``references``: zero images and empty masks."""
    missing = references - item["ref_image"].shape[0]
    if missing <= 0:
        return item
    pad = [torch.zeros(missing, *item[k].shape[1:], dtype=item[k].dtype) for k in ("ref_image", "ref_label")]
    return {**item, "ref_image": torch.cat([item["ref_image"], pad[0]]),
            "ref_label": torch.cat([item["ref_label"], pad[1]])}


class MixedEpisodeDataset(Dataset):
    """Episodes drawn from a :class:`RandomEpisodeDataset` with probability ``random_fraction``, else from a
    labelled-data episode dataset (``common.data.EpisodeDataset``).

    The source of item ``index`` in epoch ``e`` is drawn from ``(seed, e * len + index)``, so the mixture is the same
    with any number of workers; a random episode is episode ``e * len + index`` of ``random_episodes``, a labelled
    one is ``episodes[index]`` (randomised as that dataset does). Both must have the same number of class channels
    and spatial size; items are padded to the larger reference count of the sources in use (empty masks, which
    IRIS leaves out of its reference average), so they batch. :attr:`class_names` are ``episodes.class_names``:
    random episodes carry class ids -1, and a memory bank is updated from the labelled episodes only.

    Args:
        random_episodes: the generator dataset.
        episodes: the labelled-data episodes, with ``class_names``, ``classes_per_episode`` and
            ``references_per_episode`` attributes.
        random_fraction: probability of a random episode, in [0, 1]. Default 0.8.
        episodes_per_epoch: length; ``len(episodes)`` when None.
        seed: non-negative seed of the source draw. Default 0.
    """

    def __init__(
        self,
        random_episodes: RandomEpisodeDataset,
        episodes: Dataset,
        random_fraction: float = 0.8,
        episodes_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= random_fraction <= 1.0:
            raise ValueError(f"random_fraction should be in [0, 1], got {random_fraction}.")
        if random_episodes.classes_per_episode != episodes.classes_per_episode:
            raise ValueError(
                "random_episodes and episodes should have the same classes_per_episode, got "
                f"{random_episodes.classes_per_episode} and {episodes.classes_per_episode}."
            )
        self.random_episodes = random_episodes
        self.episodes = episodes
        self.random_fraction = float(random_fraction)
        self.episodes_per_epoch = len(episodes) if episodes_per_epoch is None else int(episodes_per_epoch)
        _check_counts(1, 1, self.episodes_per_epoch)
        self.seed = int(seed)
        self.class_names: list[str] = list(episodes.class_names)
        used = [d.references_per_episode for d, p in ((random_episodes, random_fraction),
                                                      (episodes, 1.0 - random_fraction)) if p > 0]
        self.references_per_episode = max(used)
        self.classes_per_episode = episodes.classes_per_episode
        self.epoch = 0

    def __len__(self) -> int:
        return self.episodes_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's draws (also of the random episodes); call before the epoch's workers start."""
        self.epoch = int(epoch)
        self.random_episodes.set_epoch(epoch)

    def is_random(self, index: int) -> bool:
        """Whether item ``index`` of the current epoch is a random episode."""
        number = self.epoch * self.episodes_per_epoch + int(index)
        return bool(np.random.default_rng(np.random.SeedSequence([self.seed, number, 1])).random()
                    < self.random_fraction)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.is_random(index):
            item = self.random_episodes.episode(self.epoch * self.episodes_per_epoch + int(index))
        else:
            item = self.episodes[int(index) % len(self.episodes)]
            size = tuple(item["image"].shape[1:])
            if size != self.random_episodes.image_size:
                raise ValueError(f"episodes should have the spatial size of random_episodes "
                                 f"{self.random_episodes.image_size}, got {size}.")
        return _pad_references(item, self.references_per_episode)
