"""Evaluator for in-context segmentation: every query is segmented with the prompt's task embeddings."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Events
from ignite.metrics import Metric
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.inferers import Inferer
from monai.transforms import Transform
from monai.utils import CommonKeys as Keys
from monai.utils import ForwardMode

from common.engines.prompt import InContextPrompt
from common.engines.robust import RobustEvaluator
from common.engines.utils import unwrap

__all__ = ["InContextEvaluator", "labels_to_class_channels"]


def labels_to_class_channels(label: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """``(B, 1, *S)`` label map -> ``(B, K, *S)`` binary masks, one channel per label value."""
    return torch.cat([(label == v) for v in values], dim=1).float()


class InContextEvaluator(RobustEvaluator):
    """A ``SupervisedEvaluator`` that segments queries with the task embeddings of an :class:`InContextPrompt`.

    At the start of each run the prompt is encoded once with the current weights (after any ``CheckpointLoader``
    handler has loaded them); each iteration then calls ``inferer(image, network.segment)`` with those embeddings,
    so any MONAI inferer (simple, sliding window) applies. A query label map, when present, becomes one binary
    channel per prompt class, in the prompt's class order, for metrics.

    Failed cases are handled as in :class:`RobustEvaluator` (``fail_on_errors`` as there).

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
        fail_on_errors: bool = True,
    ) -> None:
        super().__init__(
            fail_on_errors=fail_on_errors,
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

    def _encode_prompt(self, engine: InContextEvaluator) -> None:
        engine.state.task_embeddings = self.prompt.encode(engine.network, engine.state.device)
        engine.state.class_names = list(self.prompt.classes)

    def _process(self, engine: InContextEvaluator, batchdata: dict) -> dict:
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
