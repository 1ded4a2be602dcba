"""Label names a bundle's ``configs/metadata.json`` declares, as MONAI Label's ``/info/`` shows them."""

from __future__ import annotations

import json
import os

__all__ = ["read_metadata", "channel_names", "label_values"]


def read_metadata(bundle: str | os.PathLike) -> dict:
    """``<bundle>/configs/metadata.json`` as a dict."""
    with open(os.path.join(bundle, "configs", "metadata.json")) as f:
        return json.load(f)


def channel_names(bundle: str | os.PathLike, prefix: str = "") -> list[str]:
    """The output channels' names from ``network_data_format.outputs.pred.channel_def``, in channel order.

    With ``prefix``, only the channels whose name starts with it, without it (``"score: nodule"`` -> ``nodule``).
    """
    channel_def = read_metadata(bundle)["network_data_format"]["outputs"]["pred"]["channel_def"]
    names = [channel_def[k] for k in sorted(channel_def, key=int)]
    return [n[len(prefix):] for n in names if n.startswith(prefix)] if prefix else names


def label_values(bundle: str | os.PathLike) -> dict[str, int]:
    """Class name -> value in the bundle's output label map, from ``metadata.json``'s ``label_values``.

    A segmentation bundle whose output channels are not fixed classes (IRIS segments the classes its references
    name, one logit channel each) declares the label map's values in this field.
    """
    meta = read_metadata(bundle)
    values = meta.get("label_values")
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{bundle}/configs/metadata.json: should have 'label_values', a non-empty mapping of class "
                         "name to label value.")
    return {str(k): int(v) for k, v in values.items()}
