"""CLAHEd against scikit-image on the image's own rows and columns, and its checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from skimage.exposure import equalize_adapthist

from common.transforms.clahe import CLAHEd


def _low_contrast(height: int = 48, width: int = 80) -> np.ndarray:
    """(H, W): a dim left half and a bright right half, each with faint stripes."""
    picture = np.full((height, width), 0.3)
    picture[:, width // 2:] = 0.7
    picture[::4] += 0.02
    return picture


def test_equals_skimage_on_the_transposed_grid():
    picture = _low_contrast()
    image = MetaTensor(torch.as_tensor(picture.T[None], dtype=torch.float32), meta={"filename_or_obj": "a.png"})
    out = CLAHEd(keys="image", clip_limit=0.02, kernel_size=(16, 8))({"image": image})["image"]
    expected = equalize_adapthist(picture.astype(np.float32), kernel_size=(16, 8), clip_limit=0.02)
    np.testing.assert_allclose(out[0].numpy().T, expected, atol=1e-6)
    assert out.shape == image.shape and out.dtype == torch.float32 and out.meta["filename_or_obj"] == "a.png"


def test_raises_local_contrast():
    picture = _low_contrast()
    out = CLAHEd(keys="image")({"image": torch.as_tensor(picture.T[None], dtype=torch.float32)})["image"][0].T
    stripes = lambda a: float(np.abs(np.diff(a[:, :10], axis=0)).mean())  # noqa: E731
    assert stripes(out.numpy()) > 2 * stripes(picture)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


@pytest.mark.parametrize("image, match", [
    (torch.full((1, 8, 8), 2.0), r"\[0, 1\]"),
    (torch.zeros((1, 8, 8, 8)), "2D"),
])
def test_rejects_unscaled_or_3d_images(image, match):
    with pytest.raises(ValueError, match=match):
        CLAHEd(keys="image")({"image": image})


@pytest.mark.parametrize("kwargs", [{"clip_limit": 1.5}, {"nbins": 1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        CLAHEd(keys="image", **kwargs)
