"""Adapters serving the collection's bundles from MONAI Label (``monailabel_app/``).

MONAI Label's own bundle tasks expect a bundle to be a network between pre- and post-transforms, trained on image and
label-map pairs. Where the collection's bundles do not fit that, the adapters are here:

- :class:`BundleWorkflowInferTask` (``infer``): runs a bundle's ``inference.json`` as a workflow and returns its
  output file and JSON results, including outputs MONAI Label has no task type for (the CT encoder's embedding).
- :class:`BundleWorkflowTrainTask` (``train``): runs a bundle's ``train.json`` with MONAI Label's overrides, in a
  run folder outside the bundle.
- :class:`JsonLabels` and :class:`YoloLabels` (``datastore``): training items of a studies folder for labels
  MONAI Label's datastore does not hold (CSR concepts and diseases, CT reports, YOLO boxes).
- :func:`channel_names` and :func:`label_values` (``metadata``): the labels ``/info/`` shows, from each bundle's
  ``configs/metadata.json``.

This package imports MONAI Label (``make monailabel-env``); nothing else in ``common`` imports it, so ``common``
works without MONAI Label.
"""

from .datastore import LABELS_DIR, JsonLabels, YoloLabels, image_size, label_file
from .infer import BundleWorkflowInferTask
from .metadata import channel_names, label_values, read_metadata
from .train import LABEL_MAP_SUFFIXES, BundleWorkflowTrainTask
