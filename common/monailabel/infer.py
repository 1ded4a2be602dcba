"""Run a bundle's own ``inference.json`` on one MONAI Label study.

MONAI Label's ``BundleInferTask`` rebuilds a bundle as pre-transforms, an inferer and post-transforms around the
network. Our bundles need more than that (IRIS's in-context prompt, CSR's concept CAMs, the CT encoder's embeddings,
the YOLO detector's box decoding), so this task runs the bundle's workflow as ``monai.bundle run`` does, with the
study as its only query and a fresh output folder, and returns what the workflow wrote.

The output folder is removed before the task returns: the returned file is moved into a temporary file of its own,
which MONAI Label's ``/infer`` endpoint deletes after sending it (and after copying it into the datastore when the
request saves the label); JSON outputs are returned in the result's ``params``.

An in-context bundle (IRIS) segments what its references show. A request that names no ``references_file``, in an
app that configures none, takes its references from the studies already labelled in the datastore
(:class:`common.monailabel.datastore.LabelledReferences`): label one study, segment the rest. With no labelled study
either, the bundle's own references are used.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy
from monai.bundle import ConfigWorkflow
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from common.monailabel.metadata import read_metadata

__all__ = ["BundleWorkflowInferTask"]

logger = logging.getLogger(__name__)


class BundleWorkflowInferTask(InferTask):
    """One bundle's ``configs/inference.json`` as a MONAI Label infer task.

    Args:
        path: bundle root (``configs/``, ``models/``).
        type: MONAI Label task type shown by ``/info/``.
        labels: label names shown by ``/info/``.
        dimension: 2 or 3.
        result: ``(postfix, suffix)`` of the output file returned to the client, e.g. ``("seg", ".nii.gz")``.
        result_json: ``(postfix, suffix)`` of a JSON output whose content is returned as the result's params.
        request_ids: config ids a request may override through its ``params`` (e.g. IRIS's ``strategy``).
        is_label: whether the returned file is a label map MONAI Label may save to its datastore.
        references_file: references the app configures for requests that name none (``references_file`` should
            be one of ``request_ids``). Default None.
        labelled_references: without ``references_file`` from the request or the app, writes references from the
            datastore's labelled studies, ``labelled_references(image_path, json_path) -> ids written`` (none: the
            bundle's own references), e.g. :class:`common.monailabel.datastore.LabelledReferences`. Default None.
    """

    def __init__(
        self,
        path: str,
        type: str | InferType,
        labels: Sequence[str] | dict | None,
        dimension: int,
        result: tuple[str, str] | None = None,
        result_json: tuple[str, str] | None = None,
        request_ids: Sequence[str] = (),
        is_label: bool = False,
        references_file: str | None = None,
        labelled_references: Callable[[str, str], list[str]] | None = None,
    ):
        metadata = read_metadata(path)
        super().__init__(
            type=type,
            labels=labels,
            dimension=dimension,
            description=metadata.get("description", metadata.get("task", "")),
            config={k: "" for k in request_ids},
        )
        self.path = os.path.abspath(path)
        self.result = result
        self.result_json = result_json
        self.request_ids = tuple(request_ids)
        self.is_label = is_label
        self.references_file = references_file or None
        self.labelled_references = labelled_references

    def is_valid(self) -> bool:
        return os.path.exists(os.path.join(self.path, "configs", "inference.json")) and os.path.exists(
            os.path.join(self.path, "models", "model.pt")
        )

    def get_path(self, validate=True):
        return os.path.join(self.path, "models", "model.pt")

    def _overrides(self, request: dict[str, Any], output_dir: str) -> dict[str, Any]:
        overrides: dict[str, Any] = {"images": [request["image"]], "output_dir": output_dir, "overwrite": True}
        device = request.get("device")
        if device:
            overrides["device"] = f"$torch.device('{device}')"
        params = {**request, **(request.get("params") or {})}
        overrides.update({k: params[k] for k in self.request_ids if params.get(k) not in (None, "")})
        return overrides

    def _references(self, request: dict[str, Any], overrides: dict[str, Any], folder: str) -> list[str]:
        """Set ``references_file`` in ``overrides`` when the request names none: the app's, else one written into
        ``folder`` from the datastore's labelled studies. Returns the ids of those studies (empty otherwise)."""
        if "references_file" not in self.request_ids or overrides.get("references_file"):
            return []
        if self.references_file:
            overrides["references_file"] = self.references_file
            return []
        if self.labelled_references is None:
            return []
        path = os.path.join(folder, "references.json")
        ids = self.labelled_references(request["image"], path)
        if ids:
            overrides["references_file"] = path
            logger.info("%s: references from the labelled studies %s", request["image"], ids)
        else:
            logger.info("%s: no references in the request or the app, and no other labelled study in the "
                        "datastore: the bundle's own references", request["image"])
        return ids

    def _find(self, output_dir: str, postfix_suffix: tuple[str, str] | None) -> str | None:
        if postfix_suffix is None:
            return None
        postfix, suffix = postfix_suffix
        found = sorted(glob.glob(os.path.join(output_dir, "**", f"*_{postfix}{suffix}"), recursive=True))
        return found[0] if found else None

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict]:
        output_dir = tempfile.mkdtemp(prefix="monailabel_infer_")
        references_dir = tempfile.mkdtemp(prefix="monailabel_references_")
        try:
            overrides = self._overrides(request, output_dir)
            reference_ids = self._references(request, overrides, references_dir)
            workflow = ConfigWorkflow(
                config_file=os.path.join(self.path, "configs", "inference.json"),
                meta_file=os.path.join(self.path, "configs", "metadata.json"),
                workflow_type="infer",
                bundle_root=self.path,
                **overrides,
            )
            workflow.initialize()
            workflow.run()
            workflow.finalize()
            if not self.is_label:
                request["save_label"] = False  # a heatmap or preview is no label map for the datastore
            params: dict[str, Any] = {"references": reference_ids} if reference_ids else {}
            json_file = self._find(output_dir, self.result_json)
            if json_file:
                with open(json_file) as f:
                    params["result"] = json.load(f)
            found = self._find(output_dir, self.result)
            if found and found.endswith(".npy"):  # an embedding: MONAI Label has no task type for it
                params["embedding"] = numpy.load(found).tolist()
            written = glob.glob(f"{output_dir}/**/*.*", recursive=True)
            params["files"] = sorted(os.path.relpath(p, output_dir) for p in written)
            result_file = self._keep(found) if found else None
        finally:
            shutil.rmtree(output_dir, ignore_errors=True)
            shutil.rmtree(references_dir, ignore_errors=True)
        logger.info("%s -> %s", request["image"], result_file)
        return result_file, params

    @staticmethod
    def _keep(path: str) -> str:
        """Move the returned file out of the workflow's output folder into a file of its own, which MONAI Label
        deletes once it has answered the request (or copied the label into its datastore)."""
        fd, kept = tempfile.mkstemp(prefix="monailabel_result_", suffix=f"_{os.path.basename(path)}")
        os.close(fd)
        shutil.move(path, kept)
        return kept
