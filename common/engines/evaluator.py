"""Evaluator for in-context segmentation: every query is segmented with the prompt's task embeddings."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Events
from ignite.metrics import Metric
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.inferers import Inferer
from monai.transforms import Transform
from monai.utils import CommonKeys as Keys
from monai.utils import ForwardMode

from common.data.robust import ERROR_KEY, SOURCE_KEY
from common.engines.prompt import InContextPrompt, unwrap

__all__ = ["InContextEvaluator", "labels_to_class_channels"]


def labels_to_class_channels(label: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """``(B, 1, *S)`` label map -> ``(B, K, *S)`` binary masks, one channel per label value."""
    return torch.cat([(label == v) for v in values], dim=1).float()


def _has_output(engine, _event) -> bool:
    return engine.state.output is not None


class InContextEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` that segments queries with the task embeddings of an :class:`InContextPrompt`.

    At the start of each run the prompt is encoded once with the current weights (after any ``CheckpointLoader``
    handler has loaded them); each iteration then calls ``inferer(image, network.segment)`` with those embeddings,
    so any MONAI inferer (simple, sliding window) applies. A query label map, when present, becomes one binary
    channel per prompt class, in the prompt's class order, for metrics.

    Cases whose loading failed (items from ``ErrorTolerantDataset``) are skipped and listed in
    ``state.case_failures``; metrics see only the completed cases, listed in ``state.case_sources``.

    Args:
        prompt: the classes and strategy.
        Others as ``monai.engines.SupervisedEvaluator``.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader,
        network: torch.nn.Module,
        prompt: InContextPrompt,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        inferer: Inferer | None = None,
        postprocessing: Transform | None = None,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        mode: ForwardMode | str = ForwardMode.EVAL,
        amp_kwargs: dict | None = None,
    ) -> None:
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            inferer=inferer,
            postprocessing=postprocessing,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            val_handlers=val_handlers,
            amp=amp,
            mode=mode,
            amp_kwargs=amp_kwargs,
        )
        self.prompt = prompt
        # registered after the handlers, so a CheckpointLoader has loaded the weights before the prompt is encoded
        self.add_event_handler(Events.STARTED, self._encode_prompt)

    def run(self, global_epoch: int = 1) -> None:
        # MONAI returns quietly from an empty loader; an empty query list is a user error worth naming
        if hasattr(self.data_loader, "__len__") and len(self.data_loader) == 0:
            raise ValueError("no case to process: the query list is empty (check the queries pattern or datalist).")
        super().run(global_epoch)

    def _encode_prompt(self, engine: InContextEvaluator) -> None:
        engine.state.case_failures = []
        engine.state.case_sources = []
        engine.state.task_embeddings = self.prompt.encode(engine.network, engine.state.device)
        engine.state.class_names = list(self.prompt.classes)

    def _register_metrics(self, k_metric: dict, add_metrics: dict | None = None) -> None:
        super()._register_metrics(k_metric, add_metrics)
        # metrics update only on completed cases; a failed case has no output
        for metric in [*k_metric.values(), *(add_metrics or {}).values()]:
            if self.has_event_handler(metric.iteration_completed, Events.ITERATION_COMPLETED):
                self.remove_event_handler(metric.iteration_completed, Events.ITERATION_COMPLETED)
                self.add_event_handler(Events.ITERATION_COMPLETED(event_filter=_has_output), metric.iteration_completed)

    def _iteration(self, engine: InContextEvaluator, batchdata: dict) -> dict | None:
        if ERROR_KEY in batchdata:
            for source, message in zip(batchdata[SOURCE_KEY], batchdata[ERROR_KEY]):
                engine.state.case_failures.append({"source": source, "error": message})
            if engine.state.iteration == engine.state.epoch_length and not engine.state.case_sources:
                errors = "\n  ".join(f["error"] for f in engine.state.case_failures)
                raise RuntimeError(f"all {len(engine.state.case_failures)} case(s) failed:\n  {errors}")
            return None
        image = batchdata[Keys.IMAGE]
        engine.state.case_sources.extend(
            str(m) for m in getattr(image, "meta", {}).get("filename_or_obj", ["<in-memory>"] * len(image))
        )
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if targets is not None:
            targets = labels_to_class_channels(targets, list(self.prompt.classes.values()))
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        segment = functools.partial(unwrap(engine.network).segment, task_embeddings=engine.state.task_embeddings)
        with engine.mode(engine.network):
            if engine.amp:
                with torch.autocast("cuda", **engine.amp_kwargs):
                    engine.state.output[Keys.PRED] = engine.inferer(inputs, segment)
            else:
                engine.state.output[Keys.PRED] = engine.inferer(inputs, segment)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
