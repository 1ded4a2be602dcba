"""The ultralytics adapter of the YOLO detection bundle, in one place.

- :mod:`.env`: the one way into ultralytics (offline, a font in place, the process's threads and environment kept).
- :mod:`.dataset`: preprocessed detection items written as an ultralytics data set (images, labels, a sampled
  training list, the data YAML).
- :mod:`.trainer`: :class:`UltralyticsTrainer`, ultralytics' training driven from a bundle config.
- :mod:`.detection_trainer`: ultralytics' ``DetectionTrainer`` as the bundle runs it (imports ultralytics at import
  time, so only :class:`UltralyticsTrainer` imports it, inside ``run``).

The network (:class:`common.networks.YOLODetector`) and the inferer (:class:`common.engines.YOLODetectionInferer`)
stay with the other networks and inferers. Importing this package does not import ultralytics.
"""

from .dataset import repeat_factors, sample_training_images, write_yolo_data_yaml, write_yolo_split
from .env import import_ultralytics, keep_process_state
from .trainer import UltralyticsTrainer, ultralytics_device

__all__ = [
    "UltralyticsTrainer",
    "import_ultralytics",
    "keep_process_state",
    "repeat_factors",
    "sample_training_images",
    "ultralytics_device",
    "write_yolo_data_yaml",
    "write_yolo_split",
]
