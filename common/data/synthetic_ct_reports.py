"""Synthetic chest-abdomen CT volumes with anatomical region masks, inserted lesions and templated reports.

For volume-report alignment (CLIP-style) training and retrieval tests. Each case is a soft-tissue body in air
(:func:`common.data.synthetic3d.generate_volume` with a few distractor structures standing in for bowel, vessels and
fat) with eight organs (:data:`CT_REGIONS`) drawn as smooth, wobbly shapes at anatomical positions, and one to three
lesions (:data:`LESION_TYPES`: type, size in mm, region) painted inside their organs. The report is built from the
lesions, so retrieval is learnable and measurable: volumes differ in their lesion type / size / region combinations.

Report layout (per case, under ``"report"``)::

    {"findings": [{"text": "A 12 mm nodule in the right lung.", "region": "right_lung", "region_id": 1}, ...],
     "impression": "Right lung nodule (12 mm), follow-up recommended.",
     "cot": [{"step": "Locate the right lung, ...", "mask_region": 1}, ...],
     "regions_mentioned": [1]}

one findings sentence per region with lesions; ``cot`` is a chain of reasoning steps per lesion (locate the region,
describe the density, apply the size/density rule, conclude), each grounded by the region id of the mask, as in the
OmniAbnorm CoT layout (see :mod:`common.data.ct_rate`).

Axes: ``shape`` and lesion centres are in the network's ``(D, H, W)`` = ``(z, y, x)`` order; the NIfTI files hold
the usual ``(X, Y, Z)`` arrays with a diagonal (RAS) affine: +x patient right, +y anterior, +z superior. After
``LoadImaged`` (``(1, X, Y, Z)``), ``Transposed(indices=(0, 3, 2, 1))`` gives ``(1, D, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.data.datalist import datalist_target, write_split_datalist
from common.data.synthetic3d import (
    HU_INT16_RANGE,
    NOISE_STD_HU,
    StructureClass,
    generate_volume,
    smooth_random_field,
    write_nifti,
)

__all__ = [
    "CT_REGIONS",
    "FIELD_OF_VIEW_MM",
    "LESION_TYPES",
    "LesionType",
    "generate_ct_report_case",
    "generate_ct_report_dataset",
]

CT_REGIONS: tuple[str, ...] = (
    "right_lung", "left_lung", "heart", "liver", "spleen", "right_kidney", "left_kidney", "spine",
)
"""Region names; region id ``i + 1`` in the masks is ``CT_REGIONS[i]``, 0 is everything else."""
FIELD_OF_VIEW_MM: tuple[float, float, float] = (160.0, 320.0, 320.0)
"""``(D, H, W)`` extent in mm, whatever the voxel shape: spacing = field of view / shape."""
MIN_SHAPE = 16
MAX_LESIONS = 3

# Organs in body coordinates: u across (+ patient right), v front-back (+ anterior), both in units of the body's
# semi-axes, and w along z as a fraction of the field of view (0 inferior, 1 superior). (centre, semi-axes, HU,
# texture std in HU); organs earlier in the list win where shapes overlap.
_ORGANS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], float, float]] = {
    "spine": ((0.0, -0.66, 0.5), (0.11, 0.14, 0.0), 450.0, 20.0),  # a column through every slice (w ignored)
    "heart": ((-0.10, 0.32, 0.58), (0.26, 0.30, 0.15), 40.0, 6.0),
    "right_lung": ((0.42, 0.05, 0.70), (0.36, 0.62, 0.30), -850.0, 30.0),
    "left_lung": ((-0.44, 0.05, 0.72), (0.33, 0.60, 0.28), -850.0, 30.0),
    "right_kidney": ((0.32, -0.50, 0.16), (0.13, 0.15, 0.13), 32.0, 6.0),
    "left_kidney": ((-0.32, -0.50, 0.19), (0.13, 0.15, 0.13), 32.0, 6.0),
    "spleen": ((-0.55, -0.20, 0.30), (0.17, 0.27, 0.14), 50.0, 6.0),
    "liver": ((0.33, 0.08, 0.26), (0.45, 0.52, 0.20), 60.0, 6.0),
}
_DISC_PERIOD_MM, _DISC_HU = 28.0, 90.0  # intervertebral discs interrupt the bright vertebral column
_REGION_HINTS = {
    "right_lung": "the aerated field on the patient's right side of the chest",
    "left_lung": "the aerated field on the patient's left side of the chest, beside the heart",
    "heart": "the soft-tissue structure in the anterior mediastinum between the lungs",
    "liver": "the large homogeneous organ in the right upper abdomen under the diaphragm",
    "spleen": "the organ in the left upper abdomen, posterior and lateral",
    "right_kidney": "the bean-shaped organ in the right posterior abdomen beside the spine",
    "left_kidney": "the bean-shaped organ in the left posterior abdomen beside the spine",
    "spine": "the bright vertebral column in the posterior midline",
}
_DISTRACTORS = (
    StructureClass("bowel_gas", "tube", -450.0, 40.0, "smooth", (18.0, 30.0)),
    StructureClass("vessel", "tube", 160.0, 15.0, "smooth", (18.0, 30.0)),
    StructureClass("fat", "blob", -110.0, 15.0, "smooth", (14.0, 26.0)),
)
_SENTENCES = ("{article} {lesions} in the {region}.", "The {region} shows {article_lower} {lesions}.",
              "There is {article_lower} {lesions} in the {region}.")


@dataclass(frozen=True)
class LesionType:
    """One lesion type of the synthetic reports.

    Args:
        name: snake_case name, written to the datalist.
        noun: how reports name it ("pleural effusion").
        hu_range: ``(min, max)`` intensity in HU; each lesion draws one level.
        size_range_mm: ``(min, max)`` diameter (depth for an effusion) in mm.
        regions: names from :data:`CT_REGIONS` it can appear in.
        appearance: the reasoning step describing it ("a round soft-tissue density ...").
        rule: the reasoning step deciding the type, with ``{size}`` for the size in mm.
        qualifier: impression qualifier (", suspicious for malignancy") or "".
        severity: impression order, most severe first (higher first).
    """

    name: str
    noun: str
    hu_range: tuple[float, float]
    size_range_mm: tuple[float, float]
    regions: tuple[str, ...]
    appearance: str
    rule: str
    qualifier: str = ""
    severity: int = 0


LESION_TYPES: tuple[LesionType, ...] = (
    LesionType("nodule", "nodule", (20.0, 60.0), (5.0, 25.0), ("right_lung", "left_lung"),
               "a round soft-tissue density surrounded by aerated lung",
               "Its diameter of {size} mm is under 30 mm, so it is a nodule rather than a mass.",
               ", follow-up recommended", 3),
    LesionType("mass", "mass", (25.0, 55.0), (30.0, 45.0), ("right_lung", "left_lung", "liver"),
               "a large solid soft-tissue lesion",
               "At {size} mm it exceeds 30 mm, so it is a mass.", ", suspicious for malignancy", 5),
    LesionType("cyst", "cyst", (0.0, 15.0), (8.0, 25.0), ("liver", "spleen", "right_kidney", "left_kidney"),
               "a sharply marginated round lesion of near-water density",
               "Water attenuation with a smooth margin makes this {size} mm lesion a simple cyst.",
               ", likely benign", 1),
    LesionType("calcification", "calcification", (350.0, 800.0), (3.0, 8.0),
               ("heart", "right_lung", "left_lung", "spleen"),
               "a tiny focus of very high, bone-like density",
               "Attenuation above 300 HU means calcium: a {size} mm calcification.", ", benign-appearing", 0),
    LesionType("effusion", "pleural effusion", (5.0, 20.0), (10.0, 30.0), ("right_lung", "left_lung"),
               "fluid density layering along the dependent, posterior part of the hemithorax",
               "A dependent fluid layer {size} mm deep is a pleural effusion.", "", 4),
    LesionType("lytic_lesion", "lytic lesion", (20.0, 90.0), (6.0, 14.0), ("spine",),
               "a low-density focus replacing the bright vertebral bone",
               "Bone destroyed over {size} mm makes this a lytic lesion.", ", suspicious for metastasis", 2),
)


def _display(region: str) -> str:
    return region.replace("_", " ")


def _article(size: int) -> str:
    """'An' before sizes read with a leading vowel sound (8, 11, 18, 80-89), else 'A'."""
    return "An" if str(size).startswith("8") or size in (11, 18) else "A"


def _body_frame(body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and semi-axes (voxels) of the body's cross-section (``body`` is ``(X, Y, Z)``, a cylinder along Z)."""
    section = body.any(axis=2)
    xs, ys = np.nonzero(section)
    centre = np.array([(xs.min() + xs.max()) / 2.0, (ys.min() + ys.max()) / 2.0])
    semi = np.array([(xs.max() - xs.min() + 1) / 2.0, (ys.max() - ys.min() + 1) / 2.0])
    return centre, semi


def _draw_organs(
    rng: np.random.Generator, image: np.ndarray, body: np.ndarray, spacing: np.ndarray
) -> np.ndarray:
    """Paint the organs into ``image`` in place; returns the uint8 region mask ``(X, Y, Z)``."""
    shape = image.shape
    centre, semi = _body_frame(body)
    inner = ndimage.binary_erosion(body, iterations=2)
    u = ((np.arange(shape[0]) - centre[0]) / semi[0])[:, None, None]
    v = ((np.arange(shape[1]) - centre[1]) / semi[1])[None, :, None]
    w = ((np.arange(shape[2]) + 0.5) / shape[2])[None, None, :]
    mask = np.zeros(shape, dtype=np.uint8)
    noise_std = rng.uniform(*NOISE_STD_HU)
    for name, (c, a, hu, texture_std) in _ORGANS.items():
        c = np.asarray(c) + rng.normal(0.0, 0.02, size=3)
        a = np.asarray(a) * rng.uniform(0.92, 1.08, size=3)
        rho = ((u - c[0]) / a[0]) ** 2 + ((v - c[1]) / a[1]) ** 2
        if name != "spine":
            rho = rho + ((w - c[2]) / a[2]) ** 2
        wobble = 0.12 * np.clip(smooth_random_field(rng, shape, (5, 5, 4)), -1.5, 1.5)
        organ = (np.sqrt(rho) <= 1.0 + wobble) & inner & (mask == 0)
        mask[organ] = CT_REGIONS.index(name) + 1
        level = hu + rng.normal(0.0, 8.0)
        texture = smooth_random_field(rng, shape, (12, 12, 6), texture_std)
        if name == "spine":  # discs every ~28 mm along z
            z_mm = (np.arange(shape[2]) + 0.5) * spacing[2] + rng.uniform(0.0, _DISC_PERIOD_MM)
            texture = texture + np.where(z_mm % _DISC_PERIOD_MM < 6.0, _DISC_HU - level, 0.0)[None, None, :]
        image[organ] = (level + texture)[organ] + rng.normal(0.0, noise_std, size=int(organ.sum()))
    return mask


def _place_lesion(
    rng: np.random.Generator,
    kind: LesionType,
    region_id: int,
    mask: np.ndarray,
    occupied: np.ndarray,
    spacing: np.ndarray,
) -> tuple[np.ndarray, float, np.ndarray] | None:
    """Lesion voxels, size (mm) and centre voxel ``(x, y, z)`` of one lesion inside its region, or None if none fits.

    Sizes are drawn from the type's range and shrunk towards its minimum until a centre exists whose distance to the
    region's border is at least 0.4 of the size (so most of the lesion lies in the organ); voxels are clipped to the
    region and never overlap another lesion; the centre voxel is always painted.
    """
    free = (mask == region_id) & ~occupied
    if not free.any():
        return None
    depth = ndimage.distance_transform_edt(free, sampling=spacing)
    low, high = kind.size_range_mm
    for size in np.linspace(rng.uniform(low, high), low, 4):
        size = float(np.round(size))
        if kind.name == "effusion":  # a posterior layer: needs lung thick enough front to back
            candidates = np.argwhere(depth >= 2.0 * spacing[1])
        else:
            candidates = np.argwhere(depth >= 0.4 * size)
        if len(candidates):
            break
    else:
        return None
    centre = candidates[rng.integers(len(candidates))]
    if kind.name == "effusion":
        lung = free
        posterior = np.argmax(lung, axis=1)  # first lung voxel along +y (anterior) in each (x, z) column
        height = (np.arange(mask.shape[1])[None, :, None] - posterior[:, None, :]) * spacing[1]
        voxels = lung & (height < size)
        centre = np.argwhere(voxels)[len(np.argwhere(voxels)) // 2]
    else:
        axes = 0.5 * size * np.array([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0)])
        grids = [((np.arange(n) - c) * s / a).reshape([-1 if i == k else 1 for i in range(3)])
                 for k, (n, c, s, a) in enumerate(zip(mask.shape, centre, spacing, axes))]
        voxels = (grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2 <= 1.0) & free
    voxels[tuple(centre)] = True
    return voxels, size, centre


def _choose_lesions(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, spacing: np.ndarray
) -> list[dict]:
    """Paint 1 to ``MAX_LESIONS`` lesions into ``image`` in place; returns their records, most severe first."""
    occupied = np.zeros(mask.shape, dtype=bool)
    lesions, effusion_regions = [], set()
    wanted = int(rng.integers(1, MAX_LESIONS + 1))
    for _ in range(8 * MAX_LESIONS):
        if len(lesions) == wanted:
            break
        kind = LESION_TYPES[int(rng.integers(len(LESION_TYPES)))]
        region = kind.regions[int(rng.integers(len(kind.regions)))]
        region_id = CT_REGIONS.index(region) + 1
        if kind.name == "effusion" and region in effusion_regions:
            continue
        placed = _place_lesion(rng, kind, region_id, mask, occupied, spacing)
        if placed is None:
            continue
        voxels, size, centre = placed
        hu = float(np.round(rng.uniform(*kind.hu_range)))
        image[voxels] = hu + rng.normal(0.0, rng.uniform(*NOISE_STD_HU), size=int(voxels.sum()))
        occupied |= ndimage.binary_dilation(voxels)
        effusion_regions |= {region} if kind.name == "effusion" else set()
        lesions.append({"type": kind.name, "size_mm": int(size), "region": region, "region_id": region_id,
                        "hu": hu, "center": [int(centre[2]), int(centre[1]), int(centre[0])]})
    severity = {k.name: k.severity for k in LESION_TYPES}
    return sorted(lesions, key=lambda les: (-severity[les["type"]], les["region_id"], -les["size_mm"]))


def _report(rng: np.random.Generator, lesions: Sequence[dict]) -> dict:
    """Findings (one sentence per region), impression and reasoning steps for ``lesions`` (most severe first)."""
    kinds = {k.name: k for k in LESION_TYPES}
    findings = []
    for region_id in sorted({les["region_id"] for les in lesions}):
        region = CT_REGIONS[region_id - 1]
        here = [les for les in lesions if les["region_id"] == region_id]
        phrases = [f"{les['size_mm']} mm {kinds[les['type']].noun}" for les in here]
        articles = [_article(les["size_mm"]).lower() for les in here]
        joined = phrases[0] + "".join(f" and {a} {p}" for a, p in zip(articles[1:], phrases[1:]))
        template = _SENTENCES[int(rng.integers(len(_SENTENCES)))]
        text = template.format(article=_article(here[0]["size_mm"]), article_lower=articles[0], lesions=joined,
                               region=_display(region))
        findings.append({"text": text[0].upper() + text[1:], "region": region, "region_id": region_id})
    impression = "; ".join(
        f"{_display(les['region'])} {kinds[les['type']].noun} ({les['size_mm']} mm){kinds[les['type']].qualifier}"
        for les in lesions
    )
    cot = []
    for les in lesions:
        kind, region, r = kinds[les["type"]], _display(les["region"]), les["region_id"]
        cot += [
            {"step": f"Locate the {region}, {_REGION_HINTS[les['region']]}.", "mask_region": r},
            {"step": f"Inside the {region} there is {kind.appearance}.", "mask_region": r},
            {"step": kind.rule.format(size=les["size_mm"]), "mask_region": r},
            {"step": f"Conclusion: {_article(les['size_mm']).lower()} {les['size_mm']} mm {kind.noun} in the "
                     f"{region}.", "mask_region": r},
        ]
    return {
        "findings": findings,
        "impression": impression[0].upper() + impression[1:] + ".",
        "cot": cot,
        "regions_mentioned": sorted({les["region_id"] for les in lesions}),
    }


def generate_ct_report_case(
    rng: np.random.Generator, shape: Sequence[int] = (32, 128, 128)
) -> tuple[np.ndarray, np.ndarray, dict, list[dict], tuple[float, float, float]]:
    """One synthetic case.

    Args:
        rng: random generator; the same state gives the same case.
        shape: ``(D, H, W)`` voxels, each >= 16, spanning :data:`FIELD_OF_VIEW_MM`.

    Returns:
        ``(image, mask, report, lesions, spacing)``: float32 HU and uint8 region ids (:data:`CT_REGIONS`), both
        ``(X, Y, Z) = (W, H, D)`` (NIfTI order), the report dict, the lesion records (``type``, ``size_mm``,
        ``region``, ``region_id``, ``hu``, ``center`` as ``(d, h, w)`` voxel indices) and the ``(sx, sy, sz)`` spacing.
    """
    shape = _check_shape(shape)
    size_xyz = (shape[2], shape[1], shape[0])
    fov_xyz = np.array(FIELD_OF_VIEW_MM[::-1])
    spacing = fov_xyz / np.array(size_xyz)
    image, _ = generate_volume(rng, size_xyz, tuple(spacing), _DISTRACTORS, presence=0.7)
    image = image.astype(np.float64)
    body = image > -500.0  # the lungs are not drawn yet, so this is the body outline (fat and soft tissue)
    body = ndimage.binary_fill_holes(ndimage.binary_opening(body, iterations=1))
    mask = _draw_organs(rng, image, body, spacing)
    lesions = _choose_lesions(rng, image, mask, spacing)
    return image.astype(np.float32), mask, _report(rng, lesions), lesions, tuple(float(s) for s in spacing)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(isinstance(n, bool) or int(n) != n or n < MIN_SHAPE for n in shape):
        raise ValueError(f"shape should be 3 integers >= {MIN_SHAPE}, got {shape}.")
    return tuple(int(n) for n in shape)


def _check_arguments(num_cases, shape, seed, split) -> None:
    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
        raise ValueError(f"num_cases should be a positive integer, got {num_cases}.")
    _check_shape(shape)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed should be a non-negative integer, got {seed}.")
    if len(split) != 3 or min(split) < 0 or not np.isclose(sum(split), 1.0):
        raise ValueError(f"split should be 3 non-negative fractions summing to 1, got {split}.")


def generate_ct_report_dataset(
    out_dir: str | Path,
    num_cases: int = 64,
    shape: tuple[int, int, int] = (32, 128, 128),
    seed: int = 0,
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
) -> Path:
    """Write synthetic CT volumes, region masks and reports with a MONAI datalist.

    Writes ``images/ct_XXX.nii.gz`` (int16 HU), ``masks/ct_XXX.nii.gz`` (uint8 region ids) and ``datalist.json``::

        {"name": "synthetic_ct_reports", "description": ..., "seed": 0, "modality": "CT",
         "regions": {"1": "right_lung", ...}, "lesion_types": ["nodule", ...], "axes": ...,
         "training": [{"case_id": "ct_000", "image": "images/ct_000.nii.gz", "mask": "masks/ct_000.nii.gz",
                       "report": {...}, "lesions": [...]}, ...],
         "validation": [...], "test": [...]}

    with paths relative to ``out_dir`` and the report layout of the module docstring. Cases are split in index
    order (independent draws): validation and test take ``round(num_cases * fraction)`` each, training the rest.
    Each case has its own seed spawned from ``seed``, so the output is byte-identical for the same arguments.

    Args:
        out_dir: output folder, created if missing.
        num_cases: number of cases. Default 64.
        shape: ``(D, H, W)`` voxels, each >= 16; the files hold ``(W, H, D)`` arrays. Default ``(32, 128, 128)``.
        seed: non-negative seed. Default 0.
        split: training, validation and test fractions summing to 1. Default ``(0.7, 0.15, 0.15)``.
        overwrite: replace an existing ``datalist.json``; otherwise raise. Default False.

    Returns:
        Path of ``datalist.json``.

    Raises:
        FileExistsError: ``out_dir/datalist.json`` exists and ``overwrite`` is False.
    """
    _check_arguments(num_cases, shape, seed, split)
    out_dir = Path(out_dir)
    datalist_path = datalist_target(out_dir, overwrite)

    cases = []
    for case, child in enumerate(np.random.SeedSequence(int(seed)).spawn(num_cases)):
        image, mask, report, lesions, spacing = generate_ct_report_case(np.random.default_rng(child), shape)
        entry = {"case_id": f"ct_{case:03d}", "image": f"images/ct_{case:03d}.nii.gz",
                 "mask": f"masks/ct_{case:03d}.nii.gz", "report": report, "lesions": lesions}
        write_nifti(np.clip(np.rint(image), *HU_INT16_RANGE).astype(np.int16), spacing, out_dir / entry["image"])
        write_nifti(mask, spacing, out_dir / entry["mask"])
        cases.append(entry)

    header = {
        "name": "synthetic_ct_reports",
        "description": f"Synthetic chest-abdomen CT (HU) with {len(CT_REGIONS)} region masks, 1-{MAX_LESIONS} lesions "
        "per case and templated findings, impression and reasoning steps; made by "
        "common.data.synthetic_ct_reports.",
        "seed": int(seed),
        "modality": "CT",
        "regions": {str(i + 1): name for i, name in enumerate(CT_REGIONS)},
        "lesion_types": [k.name for k in LESION_TYPES],
        "axes": "files hold (X, Y, Z) arrays, RAS; the network takes (D, H, W) = (Z, Y, X); lesion centers are "
        "(d, h, w)",
    }
    return write_split_datalist(datalist_path, header, cases, split)
