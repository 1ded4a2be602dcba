"""A real-anatomy in-context segmentation task from the MNI152 brain template bundled with nilearn.

nilearn ships, without any download, a skull-stripped T1 template with gray- and white-matter probability maps
(documented by nilearn as the ICBM152 2009 release a template, re-scaled at 1 mm and resampled on request). The
reference example is the template T1 with a gray/white-matter label map thresholded from those maps; each query is
the template under a random smooth deformation (elastic field plus a small rotation, scaling and shift), with a
multiplicative intensity bias field and Gaussian noise, and its labels deformed the same way (nearest neighbour).
Gray and white matter are classes no model trained on :mod:`common.data.synthetic3d` has seen.

Limitation: every volume comes from one averaged subject, so queries differ from the reference only by synthetic
deformation and intensity changes, not by real anatomical variability, scanner or contrast; scores on this task are
an optimistic check of real-anatomy transfer, not a clinical validation.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.data.synthetic3d import smooth_random_field, write_nifti

__all__ = ["MNI152_CLASSES", "MNI152_SOURCE", "build_mni152_task", "mni152_label_map"]

MNI152_CLASSES: dict[str, int] = {"gray_matter": 1, "white_matter": 2}
MNI152_SOURCE = (
    "nilearn MNI152 template: nilearn.datasets.load_mni152_template, load_mni152_gm_template and "
    "load_mni152_wm_template (files mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz shipped with nilearn). "
    "nilearn documents it as the skull-stripped, re-scaled 1 mm MNI ICBM152 template, asymmetrical ICBM152 2009 "
    "release a (Fonov et al. 2009, 2011; Collins et al. 1999), resampled to the requested resolution; the licence is "
    "listed as unknown by nilearn. Labels: gray/white matter where that probability is the larger one and >= the "
    "threshold."
)
MAX_ROTATION_DEG = 10.0
SCALE_RANGE = (0.9, 1.1)
MAX_SHIFT_MM = 4.0
ELASTIC_STD_MM = 2.0
ELASTIC_CONTROL_SPACING_MM = 24.0


def mni152_label_map(gm: np.ndarray, wm: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Gray/white-matter label map from probability maps.

    Args:
        gm: gray-matter probabilities, any shape.
        wm: white-matter probabilities, same shape as ``gm``.
        threshold: minimum probability of the winning tissue, in (0, 1]. Default 0.5.

    Returns:
        uint8 array of ``gm.shape``: 1 (gray matter) where ``gm >= wm`` and ``gm >= threshold``, 2 (white matter)
        where ``wm > gm`` and ``wm >= threshold``, else 0. Ties go to gray matter.

    Example:
        >>> mni152_label_map(np.array([0.9, 0.3, 0.5, 0.1]), np.array([0.1, 0.7, 0.5, 0.2])).tolist()
        [1, 2, 1, 0]
    """
    gm, wm = np.asarray(gm), np.asarray(wm)
    if gm.shape != wm.shape:
        raise ValueError(f"wm should have the shape of gm {gm.shape}, got {wm.shape}.")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold should be in (0, 1], got {threshold}.")
    labels = np.zeros(gm.shape, dtype=np.uint8)
    labels[(gm >= wm) & (gm >= threshold)] = MNI152_CLASSES["gray_matter"]
    labels[(wm > gm) & (wm >= threshold)] = MNI152_CLASSES["white_matter"]
    return labels


@lru_cache(maxsize=2)
def _load_template(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(T1, gray-matter, white-matter probabilities, affine) from nilearn's bundled files; nothing is downloaded.

    Cached and read-only because nilearn resamples the 1 mm files on every call (seconds each).
    """
    # imported here: nilearn.datasets takes seconds to import and only this task needs it
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template, load_mni152_wm_template

    t1 = load_mni152_template(resolution=resolution)
    arrays = (
        t1.get_fdata(),
        load_mni152_gm_template(resolution=resolution).get_fdata(),
        load_mni152_wm_template(resolution=resolution).get_fdata(),
        np.asarray(t1.affine, dtype=np.float64),
    )
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation about a unit ``axis``; exactly the identity for ``angle == 0``."""
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


def _sampling_coordinates(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: float, deformation_scale: float
) -> np.ndarray:
    """Voxel coordinates in the template to sample for each query voxel, ``(3, *shape)``.

    Query voxel ``x`` samples the template at ``M (x - c) + c - t + d(x)``: ``M`` undoes a rotation and per-axis
    scaling about the volume centre ``c``, ``t`` is a shift and ``d`` a smooth elastic field. All deviations from
    the identity are multiplied by ``deformation_scale``, so 0 gives exactly the template grid.
    """
    axis = rng.standard_normal(3)
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)) * deformation_scale
    scales = 1.0 + (rng.uniform(*SCALE_RANGE, size=3) - 1.0) * deformation_scale
    matrix = _rotation(axis / np.linalg.norm(axis), angle).T / scales[:, None]
    shift = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, size=3) / spacing * deformation_scale
    control = [max(2, round(n * spacing / ELASTIC_CONTROL_SPACING_MM) + 1) for n in shape]
    elastic_std = ELASTIC_STD_MM / spacing * deformation_scale

    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    offsets = grid - centre[:, None, None, None]
    coords = np.einsum("ij,j...->i...", matrix, offsets) + (centre - shift)[:, None, None, None]
    for i in range(3):
        coords[i] += smooth_random_field(rng, shape, control, elastic_std)
    return coords


def _check_arguments(num_queries, resolution, seed, deformation_scale, bias_strength, noise_std) -> None:
    for name, value, low in [("num_queries", num_queries, 1), ("resolution", resolution, 1), ("seed", seed, 0)]:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} should be an integer >= {low}, got {value}.")
    for name, value in [("deformation_scale", deformation_scale), ("bias_strength", bias_strength),
                        ("noise_std", noise_std)]:
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{name} should be a finite number >= 0, got {value}.")


def build_mni152_task(
    out_dir: str | Path,
    num_queries: int = 4,
    resolution: int = 2,
    seed: int = 0,
    overwrite: bool = False,
    deformation_scale: float = 1.0,
    bias_strength: float = 0.15,
    noise_std: float = 0.02,
    threshold: float = 0.5,
) -> dict[str, Path]:
    """Write the MNI152 gray/white-matter in-context task: one reference and ``num_queries`` deformed queries.

    Layout under ``out_dir`` (JSON paths are relative to ``out_dir``)::

        reference/mni152_t1.nii.gz, reference/mni152_labels.nii.gz
        queries/mni152_q000.nii.gz, queries/mni152_q000_labels.nii.gz, ...
        references.json  {"classes": {"gray_matter": 1, "white_matter": 2}, "references": [{"image", "label"}],
                          "source": MNI152_SOURCE}
        datalist.json    {"name": "mni152", "modality": "MR", "labels": {"1": "gray_matter", "2": "white_matter"},
                          "test": [{"image", "label"}, ...]}

    Images are float32 (template T1 scale, about 0-1), labels uint8, all with the template's affine; at 2 mm the
    volumes are 99 x 117 x 95. Query ``k`` uses the ``k``-th seed spawned from ``seed``, so output is reproducible.

    Args:
        out_dir: output folder, created if missing.
        num_queries: number of deformed query volumes, >= 1. Default 4.
        resolution: template resolution in mm (nilearn resamples the 1 mm template), integer >= 1. Default 2.
        seed: non-negative seed. Default 0.
        overwrite: replace existing ``references.json``/``datalist.json`` and volumes; otherwise raise. Default False.
        deformation_scale: multiplies every geometric deviation from the identity: at 1, rotation up to 10 degrees
            about a random axis, per-axis scale in [0.9, 1.1], shift up to 4 mm per axis and an elastic field of
            2 mm standard deviation on a 24 mm control grid; at 0, queries share the reference's geometry exactly.
            Default 1.0.
        bias_strength: standard deviation of the log of the multiplicative bias field, >= 0. Default 0.15.
        noise_std: Gaussian noise standard deviation as a fraction of the template's maximum, >= 0. Default 0.02.
        threshold: probability threshold of :func:`mni152_label_map`. Default 0.5.

    Returns:
        ``{"references": <references.json path>, "datalist": <datalist.json path>}``.

    Raises:
        FileExistsError: ``references.json`` or ``datalist.json`` exists in ``out_dir`` and ``overwrite`` is False.
    """
    _check_arguments(num_queries, resolution, seed, deformation_scale, bias_strength, noise_std)
    out_dir = Path(out_dir)
    paths = {"references": out_dir / "references.json", "datalist": out_dir / "datalist.json"}
    for path in paths.values():
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")

    t1, gm, wm, affine = _load_template(int(resolution))
    labels = mni152_label_map(gm, wm, threshold)
    reference = {"image": "reference/mni152_t1.nii.gz", "label": "reference/mni152_labels.nii.gz"}
    write_nifti(t1.astype(np.float32), affine, out_dir / reference["image"], xform="mni")
    write_nifti(labels, affine, out_dir / reference["label"], xform="mni")

    spacing = float(np.linalg.norm(affine[:3, 0]))
    peak = float(t1.max())
    queries = []
    for index, child in enumerate(np.random.SeedSequence(int(seed)).spawn(num_queries)):
        rng = np.random.default_rng(child)
        coords = _sampling_coordinates(rng, t1.shape, spacing, deformation_scale)
        image = ndimage.map_coordinates(t1, coords, order=1, mode="constant", cval=0.0)
        query_labels = ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
        image *= np.exp(smooth_random_field(rng, t1.shape, 4, bias_strength))
        image += rng.normal(0.0, noise_std * peak, size=image.shape)
        entry = {"image": f"queries/mni152_q{index:03d}.nii.gz", "label": f"queries/mni152_q{index:03d}_labels.nii.gz"}
        # MR magnitudes are non-negative; queries are no longer in template space, hence the "aligned" code
        write_nifti(np.clip(image, 0.0, None).astype(np.float32), affine, out_dir / entry["image"], xform="aligned")
        write_nifti(query_labels.astype(np.uint8), affine, out_dir / entry["label"], xform="aligned")
        queries.append(entry)

    class_labels = {str(value): name for name, value in MNI152_CLASSES.items()}
    references = {"classes": dict(MNI152_CLASSES), "references": [reference], "source": MNI152_SOURCE}
    datalist = {
        "name": "mni152",
        "description": "MNI152 template with random smooth deformations, bias field and noise; gray and white matter "
        "classes for in-context segmentation. Single-subject template: no real anatomical variability.",
        "seed": int(seed),
        "modality": "MR",
        "labels": class_labels,
        "test": queries,
    }
    paths["references"].write_text(json.dumps(references, indent=4) + "\n")
    paths["datalist"].write_text(json.dumps(datalist, indent=4) + "\n")
    return paths
