"""MONAI Label app serving this collection's bundles offline (structure of MONAI Label's ``monaibundle`` sample app).

The bundles are linked under ``model/``; ``zoo_source`` is fixed to ``local`` so MONAI Label never downloads a
bundle, and SAM2 is not registered. Start it with ``make monailabel-start STUDIES=<folder>`` (README.md here).
"""

from __future__ import annotations

import json
import logging
import os

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import get_bundle_models

from common.monailabel import (
    BundleWorkflowInferTask,
    BundleWorkflowTrainTask,
    JsonLabels,
    YoloLabels,
    channel_names,
    label_values,
)
from common.monailabel.datastore import LabelledReferences

logger = logging.getLogger(__name__)

BUNDLES = ("iris_incontext_segmentation", "csr_cxr_classification", "ct_report_encoder", "yolo_cxr_detection")


def _train_config(path: str) -> dict:
    with open(os.path.join(path, "configs", "train.json")) as f:
        return json.load(f)


def _start_weights(path: str, config_id: str):
    """Overrides setting ``config_id`` to the shipped ``models/model.pt`` unless the request has ``pretrained``
    false, for bundles whose training does not start from MONAI Label's ``CheckpointLoader``."""
    weights = os.path.join(path, "models", "model.pt")

    def overrides(run: str, request: dict) -> dict:
        return {config_id: weights} if request.get("pretrained", True) and os.path.isfile(weights) else {}

    return overrides


def build_infer_task(name: str, path: str, datastore: Datastore | None = None, conf: dict | None = None) -> InferTask:
    """The bundle's ``inference.json`` as an infer task. IRIS takes ``conf["references_file"]`` for requests that
    name no references, else the studies labelled in ``datastore`` (README.md here: label one, segment the rest)."""
    if name == "iris_incontext_segmentation":
        values = label_values(path)
        return BundleWorkflowInferTask(
            path, InferType.SEGMENTATION, values, 3, result=("seg", ".nii.gz"), result_json=("summary", ".json"),
            request_ids=("strategy", "classes", "references_file", "intensity_mode", "image_size"), is_label=True,
            references_file=(conf or {}).get("references_file"),
            labelled_references=LabelledReferences(datastore, values) if datastore is not None else None,
        )
    if name == "csr_cxr_classification":
        return BundleWorkflowInferTask(
            path, InferType.CLASSIFICATION, channel_names(path), 2, result=("explanation", ".png"),
            result_json=("explanation", ".json"),
        )
    if name == "ct_report_encoder":
        return BundleWorkflowInferTask(path, InferType.OTHERS, [], 3, result=("global", ".npy"))
    if name == "yolo_cxr_detection":
        return BundleWorkflowInferTask(
            path, InferType.DETECTION, channel_names(path, prefix="score: "), 2, result=("detections", ".png"),
            result_json=("detections", ".json"),
        )
    raise ValueError(f"bundle should be one of {BUNDLES}, got {name}.")


def build_train_task(name: str, path: str, conf: dict, run_dir: str) -> TrainTask:
    """The bundle's ``train.json`` with its training items from the datastore (README.md here: label files)."""
    if name == "iris_incontext_segmentation":
        # datastore label maps hold the classes' label values; episodes need their names
        class_names = {str(v): k for k, v in label_values(path).items()}
        return BundleWorkflowTrainTask(
            path, conf, run_dir, item_fields={"class_names": class_names, "dataset": "monailabel"},
            request_ids=("episodes_per_epoch", "val_interval", "classes_per_episode", "image_size"),
        )
    config = _train_config(path)
    if name == "csr_cxr_classification":
        labels = JsonLabels(("concepts", "diseases"),
                            vectors={"concepts": config["concept_names"], "diseases": config["class_names"]})
        # train.json has its own CheckpointLoader (previous_checkpoint, for chaining stages), so MONAI Label adds
        # none: the shipped weights start training through it (an absolute path ignores ckpt_dir)
        return BundleWorkflowTrainTask(path, conf, run_dir, labels=labels,
                                       overrides=_start_weights(path, "previous_checkpoint"),
                                       request_ids=("val_interval", "batch_size", "image_size", "learning_rate"))
    if name == "ct_report_encoder":
        return BundleWorkflowTrainTask(path, conf, run_dir, labels=JsonLabels(("report",)),
                                       request_ids=("val_interval", "batch_size", "learning_rate"))
    if name == "yolo_cxr_detection":
        # ultralytics trains without train#handlers: the shipped weights start training through the trainer
        return BundleWorkflowTrainTask(
            path, conf, run_dir, labels=YoloLabels(len(config["class_names"])),
            overrides=_start_weights(path, "train#trainer#pretrained"),
            request_ids=("batch_size", "nominal_batch_size", "image_size", "learning_rate", "mosaic", "close_mosaic",
                         "warmup_epochs"),
        )
    raise ValueError(f"bundle should be one of {BUNDLES}, got {name}.")


class CollectionApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        conf = {"models": ",".join(BUNDLES), **conf, "zoo_source": "local"}
        model_dir = os.path.join(app_dir, "model")
        missing = [m for m in conf["models"].split(",") if not os.path.isdir(os.path.join(model_dir, m.strip()))]
        if missing:
            raise ValueError(f"bundles should be linked under {model_dir}, missing: {missing}.")
        self.models = get_bundle_models(app_dir, conf)  # local folders only: nothing is downloaded
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"Clinical Imaging Bundles - MONAI Label ({monailabel.__version__})",
            description="The collection's bundles, served offline",
            version=monailabel.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers = {}
        for name, path in self.models.items():
            infers[name] = build_infer_task(name, path, self.datastore(), self.conf)
            logger.info(f"+++ Adding Inferer:: {name} => {path}")
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers = {}
        run_dir = os.path.join(self.app_dir, "train")
        for name, path in self.models.items():
            trainers[name] = build_train_task(name, path, self.conf, run_dir)
            logger.info(f"+++ Adding Trainer:: {name} => {path}")
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}
