"""An evaluator that survives bad cases: each failure is recorded and the run goes on with the next case."""

from __future__ import annotations

from ignite.engine import Events
from monai.engines import SupervisedEvaluator

from common.data.robust import ERROR_KEY, SOURCE_KEY

__all__ = ["RobustEvaluator"]


def _has_output(engine, _event) -> bool:
    return engine.state.output is not None


class RobustEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` for datasets that report failed items (``common.data.ErrorTolerantDataset``).

    A failed item (``{"error", "source"}``) is skipped and listed in ``state.case_failures``; the completed cases
    are listed in ``state.case_sources``, and metrics see only those. A run whose every case fails raises with all
    the reasons, and an empty case list is refused up front (MONAI would return silently). Use batch size 1.
    Arguments as ``monai.engines.SupervisedEvaluator``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_event_handler(Events.STARTED, self._reset_cases)

    def run(self, global_epoch: int = 1) -> None:
        if hasattr(self.data_loader, "__len__") and len(self.data_loader) == 0:
            raise ValueError("no case to process: the case list is empty (check the input pattern or datalist).")
        super().run(global_epoch)

    @staticmethod
    def _reset_cases(engine: RobustEvaluator) -> None:
        engine.state.case_failures = []
        engine.state.case_sources = []

    def _register_metrics(self, k_metric: dict, add_metrics: dict | None = None) -> None:
        super()._register_metrics(k_metric, add_metrics)
        # metrics update only on completed cases; a failed case has no output
        for metric in [*k_metric.values(), *(add_metrics or {}).values()]:
            if self.has_event_handler(metric.iteration_completed, Events.ITERATION_COMPLETED):
                self.remove_event_handler(metric.iteration_completed, Events.ITERATION_COMPLETED)
                self.add_event_handler(Events.ITERATION_COMPLETED(event_filter=_has_output), metric.iteration_completed)

    def _iteration(self, engine: RobustEvaluator, batchdata: dict) -> dict | None:
        if ERROR_KEY in batchdata:
            for source, message in zip(batchdata[SOURCE_KEY], batchdata[ERROR_KEY]):
                engine.state.case_failures.append({"source": source, "error": message})
            if engine.state.iteration == engine.state.epoch_length and not engine.state.case_sources:
                errors = "\n  ".join(f["error"] for f in engine.state.case_failures)
                raise RuntimeError(f"all {len(engine.state.case_failures)} case(s) failed:\n  {errors}")
            return None
        image = batchdata.get("image")
        sources = getattr(image, "meta", {}).get("filename_or_obj", ["<in-memory>"] * len(image))
        engine.state.case_sources.extend(str(s) for s in sources)
        return self._process(engine, batchdata)

    def _process(self, engine: RobustEvaluator, batchdata: dict) -> dict:
        """One completed case: the plain ``SupervisedEvaluator`` iteration unless a subclass changes it."""
        return super()._iteration(engine, batchdata)
