"""Synthetic CT-like 3D volumes with many structure classes, for in-context segmentation.

Each :class:`StructureClass` keeps one identity across volumes -- shape family, Hounsfield-unit level, texture and
physical size range -- while every volume draws its own size, aspect ratio, position, orientation and exact
intensity. A labelled reference volume therefore predicts a class in a query volume without being a copy of it,
which is what in-context segmentation (IRIS) training and testing need. :data:`HELDOUT_CLASSES` names classes that
training must skip, so evaluation can measure generalisation to structures never seen.

Volumes are made of a soft-tissue body (an elliptic cylinder with a subcutaneous fat layer) in air, smooth
low-frequency intensity variation and Gaussian noise; the structures sit inside the body, apart from each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from .datalist import datalist_target, write_split_datalist

__all__ = [
    "HELDOUT_CLASSES",
    "SHAPES",
    "SYNTHETIC_CLASSES",
    "StructureClass",
    "TEXTURES",
    "generate_synthetic_3d",
    "generate_volume",
    "smooth_random_field",
    "write_nifti",
]

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = (20.0, 50.0)
NOISE_STD_HU = (10.0, 20.0)
LOW_FREQUENCY_STD_HU = 8.0
SPECKLE_STD_HU = 35.0
STRIPE_AMPLITUDE_HU = 50.0
GRADIENT_AMPLITUDE_HU = 70.0
MIN_PRESENT = 3
MAX_ATTEMPTS = 60
MIN_SHAPE = 16
HU_INT16_RANGE = (-1024, 3071)  # the usual 12-bit CT range stored in int16

ShapeFn = Callable[[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray, np.random.Generator], np.ndarray]
TextureFn = Callable[[np.ndarray, float, np.ndarray, np.random.Generator], np.ndarray]


# Shape functions map local coordinates (mm, along the structure's own axes) to a mask. Every shape fits inside the
# sphere of diameter ``size``, which is what sizes the sampling box in ``_try_place``.
def _ellipsoid(u, v, w, size, spacing, rng):
    axes = 0.5 * size * np.array([1.0, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)])
    return (u / axes[0]) ** 2 + (v / axes[1]) ** 2 + (w / axes[2]) ** 2 <= 1.0


def _cuboid(u, v, w, size, spacing, rng):
    # size is the diagonal, so the box fits the sphere of diameter ``size`` like every other shape
    sides = np.array([1.0, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)])
    half = 0.5 * size * sides / np.linalg.norm(sides)
    return (np.abs(u) <= half[0]) & (np.abs(v) <= half[1]) & (np.abs(w) <= half[2])


def _tube(u, v, w, size, spacing, rng):
    radius = max(size * rng.uniform(0.1, 0.16), 2.0)
    sag = size * rng.uniform(0.0, 0.15)
    half_length = np.sqrt(max((0.5 * size) ** 2 - (0.5 * sag + radius) ** 2, radius**2))
    curvature = sag / half_length**2
    centre_v = curvature * u**2 - 0.5 * sag  # a gently bent centre line, centred on the origin
    return (np.abs(u) <= half_length) & ((v - centre_v) ** 2 + w**2 <= radius**2)


def _shell(u, v, w, size, spacing, rng):
    outer = 0.5 * size * np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0)])
    # thick enough that 3 mm slices do not sample straight through the wall
    inner = outer - max(size * rng.uniform(0.12, 0.2), 3.5)
    rho_outer = (u / outer[0]) ** 2 + (v / outer[1]) ** 2 + (w / outer[2]) ** 2
    rho_inner = (u / inner[0]) ** 2 + (v / inner[1]) ** 2 + (w / inner[2]) ** 2
    return (rho_outer <= 1.0) & (rho_inner > 1.0)


def _torus(u, v, w, size, spacing, rng):
    minor = max(size * rng.uniform(0.12, 0.2), 2.5)
    major = 0.5 * size - minor
    return (np.sqrt(u**2 + v**2) - major) ** 2 + w**2 <= minor**2


def _blob(u, v, w, size, spacing, rng):
    wobble = 0.35
    axes = 0.5 * size / (1.0 + wobble) * np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)])
    rho = np.sqrt((u / axes[0]) ** 2 + (v / axes[1]) ** 2 + (w / axes[2]) ** 2)
    noise = ndimage.gaussian_filter(rng.standard_normal(rho.shape), sigma=size / 6.0 / spacing, mode="nearest")
    noise /= max(float(noise.std()), 1e-6)
    mask = rho <= 1.0 + wobble * np.clip(noise, -1.0, 1.0)
    components, count = ndimage.label(mask)
    if count > 1:  # one connected blob, not a scatter of fragments
        sizes = np.bincount(components.ravel())[1:]
        mask = components == 1 + int(np.argmax(sizes))
    return mask


def _plate(u, v, w, size, spacing, rng):
    thickness = rng.uniform(3.5, 5.0)
    sag = size * rng.uniform(0.0, 0.08)
    ratio = rng.uniform(0.6, 1.0)
    half_u = np.sqrt(max((0.5 * size) ** 2 - (0.5 * thickness + sag) ** 2, 1.0) / (1.0 + ratio**2))
    centre_w = sag * (u / half_u) ** 2 - 0.5 * sag  # slightly curved, like a bone plate
    return (np.abs(u) <= half_u) & (np.abs(v) <= ratio * half_u) & (np.abs(w - centre_w) <= 0.5 * thickness)


def _nodules(u, v, w, size, spacing, rng):
    mask = np.zeros(np.broadcast_shapes(u.shape, v.shape, w.shape), dtype=bool)
    for _ in range(int(rng.integers(3, 7))):
        radius = min(rng.uniform(2.5, 4.0), 0.25 * size)
        direction = rng.standard_normal(3)
        centre = direction / np.linalg.norm(direction) * (0.5 * size - radius) * rng.uniform() ** (1.0 / 3.0)
        mask |= (u - centre[0]) ** 2 + (v - centre[1]) ** 2 + (w - centre[2]) ** 2 <= radius**2
    return mask


# Texture functions map the long-axis coordinate ``u`` (mm) to zero-mean HU offsets.
def _smooth(u, size, spacing, rng):
    return np.zeros_like(u)


def _speckled(u, size, spacing, rng):
    speckle = ndimage.gaussian_filter(rng.standard_normal(u.shape), sigma=0.8, mode="nearest")
    return SPECKLE_STD_HU * speckle / max(float(speckle.std()), 1e-6)


def _striped(u, size, spacing, rng):
    # periods above twice the coarsest slice spacing, so stripes survive 3 mm slices
    return STRIPE_AMPLITUDE_HU * np.sin(2.0 * np.pi * u / rng.uniform(7.0, 10.0) + rng.uniform(0.0, 2.0 * np.pi))


def _gradient(u, size, spacing, rng):
    return GRADIENT_AMPLITUDE_HU * np.clip(u / (0.5 * size), -1.0, 1.0)


_SHAPE_FNS: dict[str, ShapeFn] = {
    "ellipsoid": _ellipsoid,
    "cuboid": _cuboid,
    "tube": _tube,
    "shell": _shell,
    "torus": _torus,
    "blob": _blob,
    "plate": _plate,
    "nodules": _nodules,
}
_TEXTURE_FNS: dict[str, TextureFn] = {
    "smooth": _smooth,
    "speckled": _speckled,
    "striped": _striped,
    "gradient": _gradient,
}
SHAPES: tuple[str, ...] = tuple(_SHAPE_FNS)
TEXTURES: tuple[str, ...] = tuple(_TEXTURE_FNS)


@dataclass(frozen=True)
class StructureClass:
    """One synthetic structure class: what stays the same for the class in every volume.

    Args:
        name: snake_case name, written to datalists.
        shape: shape family, one of :data:`SHAPES`: ``"ellipsoid"``, ``"cuboid"``, ``"tube"`` (bent cylinder
            segment), ``"shell"`` (hollow ellipsoid wall), ``"torus"``, ``"blob"`` (thresholded smooth noise),
            ``"plate"`` (thin curved slab) or ``"nodules"`` (cluster of 3-6 small spheres).
        hu_mean: mean intensity of the class in Hounsfield units.
        hu_std: spread, across volumes, of a volume's class intensity around ``hu_mean`` (one draw per volume,
            clipped to two standard deviations).
        texture: one of :data:`TEXTURES`: ``"smooth"``, ``"speckled"`` (fine correlated noise), ``"striped"``
            (sinusoid along the structure's own long axis) or ``"gradient"`` (linear ramp along that axis).
            Textures are zero-mean, so the class mean stays near ``hu_mean``.
        size_range_mm: ``(min, max)`` of the structure's largest extent (diameter of its bounding sphere) in mm.
    """

    name: str
    shape: str
    hu_mean: float
    hu_std: float = 15.0
    texture: str = "smooth"
    size_range_mm: tuple[float, float] = (12.0, 20.0)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum() or self.name != self.name.lower():
            raise ValueError(f"name should be a non-empty snake_case string, got {self.name!r}.")
        if self.shape not in _SHAPE_FNS:
            raise ValueError(f"shape should be one of {SHAPES}, got {self.shape!r}.")
        if self.texture not in _TEXTURE_FNS:
            raise ValueError(f"texture should be one of {TEXTURES}, got {self.texture!r}.")
        if not -1000.0 < self.hu_mean < 3000.0:
            raise ValueError(f"hu_mean should be a Hounsfield value in (-1000, 3000), got {self.hu_mean}.")
        if self.hu_std < 0:
            raise ValueError(f"hu_std should be >= 0, got {self.hu_std}.")
        low, high = self.size_range_mm
        if not 4.0 <= low <= high:
            raise ValueError(f"size_range_mm should be (min, max) with 4 <= min <= max, got {self.size_range_mm}.")


SYNTHETIC_CLASSES: tuple[StructureClass, ...] = (
    StructureClass("bright_ellipsoid", "ellipsoid", 200.0, 15.0, "smooth", (12.0, 22.0)),
    StructureClass("dark_tube", "tube", -450.0, 40.0, "smooth", (18.0, 30.0)),
    StructureClass("speckled_cuboid", "cuboid", 90.0, 15.0, "speckled", (14.0, 24.0)),
    StructureClass("hollow_shell", "shell", 160.0, 15.0, "smooth", (16.0, 26.0)),
    StructureClass("fat_blob", "blob", -110.0, 15.0, "smooth", (14.0, 26.0)),
    StructureClass("bone_plate", "plate", 290.0, 20.0, "smooth", (18.0, 30.0)),
    StructureClass("lung_ellipsoid", "ellipsoid", -600.0, 40.0, "speckled", (16.0, 26.0)),
    StructureClass("striped_ellipsoid", "ellipsoid", -250.0, 20.0, "striped", (14.0, 24.0)),
    StructureClass("gradient_cuboid", "cuboid", 180.0, 20.0, "gradient", (14.0, 24.0)),
    StructureClass("nodule_cluster", "nodules", 130.0, 15.0, "smooth", (14.0, 22.0)),
    StructureClass("ring_torus", "torus", 240.0, 20.0, "smooth", (16.0, 26.0)),
    StructureClass("speckled_blob", "blob", -300.0, 25.0, "speckled", (14.0, 24.0)),
)
"""The default classes; label value ``i + 1`` marks ``SYNTHETIC_CLASSES[i]``."""

HELDOUT_CLASSES: tuple[str, ...] = ("nodule_cluster", "ring_torus", "speckled_blob")
"""Names never to train on: a shape family (torus, nodule cluster) or shape-texture pair (speckled blob) unseen."""


def smooth_random_field(
    rng: np.random.Generator, shape: Sequence[int], control_points: int | Sequence[int] = 4, std: float = 1.0
) -> np.ndarray:
    """Smooth random field: Gaussian values on a coarse grid, cubic-spline interpolated to ``shape``.

    Interpolation is separable (one small matrix per axis), so a 100^3 field costs milliseconds.

    Args:
        rng: random generator.
        shape: output shape, any number of axes.
        control_points: control points per axis (one int for all axes), each >= 2. Default 4.
        std: standard deviation of the returned field (it is rescaled to exactly this). Default 1.0.

    Returns:
        float64 array of ``shape``, zero-mean in distribution.
    """
    shape = tuple(int(n) for n in shape)
    points = (int(control_points),) * len(shape) if np.isscalar(control_points) else tuple(control_points)
    if len(points) != len(shape) or min(points) < 2:
        raise ValueError(f"control_points should be >= 2 for each of {len(shape)} axes, got {control_points}.")
    field = rng.standard_normal(points)
    for axis, (n_in, n_out) in enumerate(zip(points, shape)):
        weights = CubicSpline(np.arange(n_in), np.eye(n_in))(np.linspace(0.0, n_in - 1.0, n_out))
        field = np.moveaxis(np.tensordot(weights, field, axes=(1, axis)), 0, axis)
    return field * (std / max(float(field.std()), 1e-12))


def write_nifti(
    array: np.ndarray, spacing_or_affine: Sequence[float] | np.ndarray, path: str | Path, xform: str = "scanner"
) -> Path:
    """Write ``array`` as NIfTI, keeping its dtype.

    Args:
        array: 3D array, written as is (cast it first).
        spacing_or_affine: voxel spacing in mm (3 numbers; the volume is then centred on the origin) or a 4x4 affine.
        path: output file, ``.nii`` or ``.nii.gz``; folders are created. ``.nii.gz`` output is byte-reproducible
            (nibabel writes a zero gzip timestamp).
        xform: NIfTI qform/sform code name, e.g. ``"scanner"``, ``"aligned"`` or ``"mni"``. Default ``"scanner"``.

    Returns:
        ``path`` as a ``Path``.
    """
    geometry = np.asarray(spacing_or_affine, dtype=np.float64)
    if geometry.shape == (4, 4):
        affine = geometry
    elif geometry.shape == (3,) and np.all(geometry > 0):
        affine = np.diag([*geometry, 1.0])
        affine[:3, 3] = -0.5 * (np.asarray(array.shape[:3]) - 1) * geometry
    else:
        raise ValueError(f"spacing_or_affine should be 3 positive spacings or a 4x4 affine, got {spacing_or_affine}.")
    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=xform)
    image.set_sform(affine, code=xform)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3x3 rotation (from a normalised Gaussian quaternion)."""
    quaternion = rng.standard_normal(4)
    a, b, c, d = quaternion / np.linalg.norm(quaternion)
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )


def _body(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Air, a fat-rimmed soft-tissue elliptic cylinder along the last axis; returns (image, body, inner body)."""
    fov = np.asarray(shape) * spacing
    centre = 0.5 * fov[:2] + rng.uniform(-3.0, 3.0, size=2)
    semi = 0.5 * fov[:2] * np.array([rng.uniform(0.82, 0.94), rng.uniform(0.68, 0.85)])
    fat = rng.uniform(3.0, 6.0)
    x = ((np.arange(shape[0]) + 0.5) * spacing[0] - centre[0])[:, None]
    y = ((np.arange(shape[1]) + 0.5) * spacing[1] - centre[1])[None, :]
    body2d = (x / semi[0]) ** 2 + (y / semi[1]) ** 2 <= 1.0
    inner2d = (x / (semi[0] - fat)) ** 2 + (y / (semi[1] - fat)) ** 2 <= 1.0
    body = np.broadcast_to(body2d[:, :, None], shape)
    inner = np.broadcast_to(inner2d[:, :, None], shape).copy()
    image = np.full(shape, AIR_HU)
    image[body] = FAT_HU + rng.normal(0.0, 10.0)
    image[inner] = rng.uniform(*SOFT_TISSUE_HU)
    return image, body, inner


def _try_place(
    rng: np.random.Generator, spec: StructureClass, occupied: np.ndarray, spacing: np.ndarray, size: float
) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray] | None:
    """One rejection-sampling attempt; returns (box, mask in box, local long-axis coordinate) or None."""
    half = np.ceil(0.5 * size / spacing).astype(int) + 1
    if np.any(2 * half + 1 > np.asarray(occupied.shape)):
        return None
    centre = np.array([rng.integers(h, n - h) for h, n in zip(half, occupied.shape)])
    if occupied[tuple(centre)]:
        return None
    box = tuple(slice(c - h, c + h + 1) for c, h in zip(centre, half))
    offsets = [(np.arange(-h, h + 1) * s).reshape([-1 if i == axis else 1 for i in range(3)])
               for axis, (h, s) in enumerate(zip(half, spacing))]
    rotation = _random_rotation(rng)
    u, v, w = (sum(rotation[row, axis] * offsets[axis] for axis in range(3)) for row in range(3))
    mask = _SHAPE_FNS[spec.shape](u, v, w, size, spacing, rng)
    if not mask.any() or occupied[box][mask].any():
        return None
    return box, mask, np.broadcast_to(u, mask.shape)


def _placement_order(rng: np.random.Generator, num_classes: int, presence: float) -> tuple[np.ndarray, np.ndarray]:
    """Classes drawn present (random order, at least ``MIN_PRESENT`` when there are enough) and the others, shuffled.

    The others are fallbacks: they are tried only while fewer than ``MIN_PRESENT`` classes found room.
    """
    order = rng.permutation(num_classes)
    keep = rng.random(num_classes) < presence
    keep[: min(MIN_PRESENT, num_classes)] = True  # the first of a random order, so any class can be the forced one
    return order[keep], order[~keep]


def _place_structure(
    rng: np.random.Generator,
    spec: StructureClass,
    value: int,
    image: np.ndarray,
    label: np.ndarray,
    occupied: np.ndarray,
    spacing: np.ndarray,
) -> bool:
    """Rejection-sample one structure of ``spec`` into free space, paint it in place; False if it found no room."""
    low, high = spec.size_range_mm
    for attempt in range(MAX_ATTEMPTS):
        # later attempts draw from a range shrinking towards the minimum size, so crowded bodies still fit
        size = rng.uniform(low, high - (high - low) * attempt / MAX_ATTEMPTS)
        placed = _try_place(rng, spec, occupied, spacing, size)
        if placed is not None:
            break
    if placed is None:
        return False
    box, mask, along = placed
    level = spec.hu_mean + spec.hu_std * np.clip(rng.standard_normal(), -2.0, 2.0)
    texture = _TEXTURE_FNS[spec.texture](np.array(along, dtype=np.float64), size, spacing, rng)
    image[box][mask] = level + texture[mask]
    label[box][mask] = value
    occupied[box] |= ndimage.binary_dilation(mask)
    return True


def generate_volume(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    classes: Sequence[StructureClass],
    presence: float = 0.85,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic CT-like volume and its label map.

    Each class is present with probability ``presence``, and at least 3 are (when there are 3 classes and the body
    has room). A class is placed by rejection sampling at a random position inside the body with a random size
    within its ``size_range_mm`` (in mm, so anisotropic spacing is respected) and a random orientation. Structures
    never overlap or touch: an occupancy map grown by one voxel around each placed structure rejects later
    candidates. A class that finds no room after ``MAX_ATTEMPTS`` tries (its size range shrinking towards the
    minimum) is left out of that volume, and classes drawn absent stand in while fewer than 3 are placed. At the
    default sizes this happens only in crowded volumes; fields of view under about 40 mm may hold fewer than 3.

    Args:
        rng: random generator; the same generator state gives the same volume.
        shape: ``(X, Y, Z)`` voxels, each >= 16.
        spacing: ``(sx, sy, sz)`` voxel size in mm, each > 0.
        classes: the structure classes; label ``i + 1`` marks ``classes[i]``, at most 255 classes.
        presence: probability that each class is present, in [0, 1]. Default 0.85.

    Returns:
        ``(image, label)``: float32 Hounsfield units of ``shape`` and a uint8 label map of ``shape``.

    Example:
        >>> image, label = generate_volume(np.random.default_rng(0), (64, 64, 48), (1.0, 1.0, 2.5), SYNTHETIC_CLASSES)
        >>> image.dtype, label.dtype, image.shape
        (dtype('float32'), dtype('uint8'), (64, 64, 48))
    """
    shape = _check_shape(shape)
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (3,) or not np.all(spacing_arr > 0):
        raise ValueError(f"spacing should be 3 positive numbers, got {spacing}.")
    _check_classes(classes)
    if not 0.0 <= presence <= 1.0:
        raise ValueError(f"presence should be in [0, 1], got {presence}.")

    image, body, inner = _body(rng, shape, spacing_arr)
    label = np.zeros(shape, dtype=np.uint8)
    occupied = ~inner  # structures stay inside the soft tissue, clear of the fat rim
    chosen, fallbacks = _placement_order(rng, len(classes), presence)
    num_placed = sum(_place_structure(rng, classes[i], i + 1, image, label, occupied, spacing_arr) for i in chosen)
    for index in fallbacks:
        if num_placed >= MIN_PRESENT:
            break
        num_placed += _place_structure(rng, classes[index], index + 1, image, label, occupied, spacing_arr)

    image[body] += smooth_random_field(rng, shape, 4, LOW_FREQUENCY_STD_HU)[body]
    image += rng.normal(0.0, rng.uniform(*NOISE_STD_HU), size=shape)
    return image.astype(np.float32), label


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(n) != n or n < MIN_SHAPE for n in shape):
        raise ValueError(f"shape should be 3 integers >= {MIN_SHAPE}, got {shape}.")
    return tuple(int(n) for n in shape)


def _check_classes(classes: Sequence[StructureClass]) -> None:
    if not 1 <= len(classes) <= 255 or not all(isinstance(c, StructureClass) for c in classes):
        raise ValueError(f"classes should be 1 to 255 StructureClass objects, got {classes}.")
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"classes should have unique names, got {names}.")


def _check_arguments(num_cases, shape, spacing_range, seed, split, shape_jitter) -> None:
    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
        raise ValueError(f"num_cases should be a positive integer, got {num_cases}.")
    _check_shape(shape)
    try:
        ranges = np.asarray(spacing_range, dtype=np.float64)
    except (TypeError, ValueError):
        ranges = np.zeros(0)
    if ranges.shape != (3, 2) or not np.all(ranges > 0) or np.any(ranges[:, 0] > ranges[:, 1]):
        raise ValueError(f"spacing_range should be 3 (min, max) pairs with 0 < min <= max, got {spacing_range}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed should be a non-negative integer, got {seed}.")
    if len(split) != 3 or min(split) < 0 or not np.isclose(sum(split), 1.0):
        raise ValueError(f"split should be 3 non-negative fractions summing to 1, got {split}.")
    if isinstance(shape_jitter, bool) or not isinstance(shape_jitter, (int, np.integer)) or shape_jitter < 0:
        raise ValueError(f"shape_jitter should be a non-negative integer, got {shape_jitter}.")


def generate_synthetic_3d(
    out_dir: str | Path,
    num_cases: int = 24,
    shape: tuple[int, int, int] = (64, 64, 48),
    spacing_range: Sequence[tuple[float, float]] = ((0.8, 1.2), (0.8, 1.2), (1.5, 3.0)),
    classes: Sequence[StructureClass] | None = None,
    seed: int = 0,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
    shape_jitter: int = 8,
) -> Path:
    """Write a synthetic CT data set and its MONAI (decathlon-style) datalist.

    Writes ``imagesTr/synth_XXX.nii.gz`` (int16 HU) and ``labelsTr/synth_XXX.nii.gz`` (uint8, label ``i + 1`` for
    ``classes[i]``) under ``out_dir``, each case with its own random spacing and a shape within ``shape_jitter``
    voxels of ``shape`` (so pipelines must resample), then ``datalist.json``::

        {"name": "synthetic3d", "description": ..., "seed": 0, "modality": "CT",
         "labels": {"1": "bright_ellipsoid", ...}, "heldout_labels": ["nodule_cluster", ...],
         "training": [{"image": "imagesTr/synth_000.nii.gz", "label": "labelsTr/synth_000.nii.gz"}, ...],
         "validation": [...], "test": [...]}

    Paths are relative to ``out_dir``. Cases are split in index order (they are independent draws); the validation
    and test counts are ``round(num_cases * fraction)`` and training takes the rest. Each case has its own seed
    spawned from ``seed``, so the output is byte-identical for the same arguments.

    Args:
        out_dir: output folder, created if missing.
        num_cases: number of volumes. Default 24.
        shape: nominal ``(X, Y, Z)`` voxels, each >= 16. Default ``(64, 64, 48)``.
        spacing_range: ``(min, max)`` spacing in mm per axis, drawn uniformly per case.
            Default ``((0.8, 1.2), (0.8, 1.2), (1.5, 3.0))``.
        classes: structure classes; default :data:`SYNTHETIC_CLASSES`.
        seed: non-negative seed. Default 0.
        split: training, validation and test fractions, summing to 1. Default ``(0.7, 0.15, 0.15)``.
        overwrite: replace an existing ``datalist.json`` and its cases; otherwise raise. Default False.
        shape_jitter: per-axis shape change drawn from ``[-shape_jitter, shape_jitter]``, floored at 16.
            Default 8.

    Returns:
        Path of ``datalist.json``.

    Raises:
        FileExistsError: ``out_dir/datalist.json`` exists and ``overwrite`` is False.
    """
    classes = SYNTHETIC_CLASSES if classes is None else tuple(classes)
    _check_classes(classes)
    _check_arguments(num_cases, shape, spacing_range, seed, split, shape_jitter)
    out_dir = Path(out_dir)
    datalist_path = datalist_target(out_dir, overwrite)

    cases = []
    for case, child in enumerate(np.random.SeedSequence(int(seed)).spawn(num_cases)):
        rng = np.random.default_rng(child)
        spacing = tuple(float(rng.uniform(low, high)) for low, high in spacing_range)
        jitter = rng.integers(-shape_jitter, shape_jitter + 1, size=3)
        case_shape = tuple(max(MIN_SHAPE, int(n + j)) for n, j in zip(shape, jitter))
        image, label = generate_volume(rng, case_shape, spacing, classes)
        entry = {"image": f"imagesTr/synth_{case:03d}.nii.gz", "label": f"labelsTr/synth_{case:03d}.nii.gz"}
        write_nifti(np.clip(np.rint(image), *HU_INT16_RANGE).astype(np.int16), spacing, out_dir / entry["image"])
        write_nifti(label, spacing, out_dir / entry["label"])
        cases.append(entry)

    header = {
        "name": "synthetic3d",
        "description": f"Synthetic CT-like volumes (HU) with {len(classes)} structure classes that vary in size, "
        "position, orientation and intensity per case; made by common.data.synthetic3d.",
        "seed": int(seed),
        "modality": "CT",
        "labels": {str(i + 1): c.name for i, c in enumerate(classes)},
        "heldout_labels": [c.name for c in classes if c.name in HELDOUT_CLASSES],
    }
    write_split_datalist(datalist_path, header, cases, split)
    return datalist_path
