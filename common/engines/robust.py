"""An evaluator that survives bad cases: each failure is recorded and the run goes on with the next case."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents, engine_apply_transform

from common.bundle.args import as_bool, is_bundle_runner, user_error
from common.data.robust import ERROR_KEY, SKIPPED_KEY, SOURCE_KEY, root_cause

__all__ = ["RobustEvaluator", "CasesFailedError"]

logger = logging.getLogger(__name__)
# problems with the user's files or settings that stop a whole run; their message names the file and the problem
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError)


class CasesFailedError(RuntimeError):
    """Every case of a run failed; the message lists each file and its problem."""


def _has_output(engine, _event) -> bool:
    return engine.state.output is not None


class RobustEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` for datasets that report failed items (``common.data.ErrorTolerantDataset``).

    A failed item (``{"error", "source"}``) is skipped and listed in ``state.case_failures``; an item refused because
    its outputs exist (``"skipped"``) in ``state.case_skipped``; the completed cases are listed in
    ``state.case_sources``, and metrics see only those. An empty case list is refused up front (MONAI would return
    silently); a run whose every case fails stops with all the reasons; a run where some cases failed finishes
    every other case and every handler, then raises (exit status 1 from ``python -m monai.bundle run``) naming how
    many failed. A case whose outputs cannot be written (``postprocessing`` raises: a read-only folder, a name
    too long) fails alone, named by its file. Use batch size 1.

    Args:
        fail_on_errors: raise at the end of a run with failed cases. Default True; False for a validator run by
            a trainer's ``ValidationHandler``, so a bad validation case does not stop training (it is still
            logged and reported).
        source_key: the batch key naming each case's source when it is not the image's ``filename_or_obj`` (e.g.
            ``"report"``). Default None: the image's.
        Others as ``monai.engines.SupervisedEvaluator``.
    """

    def __init__(self, *args, fail_on_errors: bool = True, source_key: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source_key = source_key
        self.fail_on_errors = as_bool(fail_on_errors, "fail_on_errors")
        self.add_event_handler(Events.STARTED, self._reset_cases)

    def run(self, global_epoch: int = 1) -> None:
        if hasattr(self.data_loader, "__len__") and len(self.data_loader) == 0:
            raise user_error("no case to process: the case list is empty (check the input pattern or datalist).",
                             ValueError)
        try:
            super().run(global_epoch)
        except CasesFailedError as e:  # the case report was written by its EXCEPTION_RAISED handler
            raise user_error(str(e), CasesFailedError) from None
        except USER_ERRORS as e:  # e.g. a bad reference or weights file: its message, not a chained traceback
            logger.debug("run stopped", exc_info=True)
            if is_bundle_runner():
                raise SystemExit(f"{type(e).__name__}: {e}") from None
            raise
        if self.fail_on_errors:
            self.raise_failures()

    def raise_failures(self) -> None:
        """Raise (exit status 1 from MONAI's runner) when the last run had failed cases, naming them; a function that
        runs the evaluator and then writes results (a strategy sweep, retrieval metrics) sets ``fail_on_errors`` off
        for the run and calls this once its files are written."""
        failures = self.state.case_failures
        if failures:
            errors = "\n  ".join(f["error"] for f in failures)
            raise user_error(f"{len(failures)} case(s) failed, {len(self.state.case_sources)} completed (their outputs "
                             f"are written; see the run report):\n  {errors}", CasesFailedError)

    def _register_postprocessing(self, posttrans: Callable) -> None:
        @self.on(IterationEvents.MODEL_COMPLETED)
        def _run_postprocessing(engine: RobustEvaluator) -> None:
            try:
                if not isinstance(engine.state.batch, list) or not isinstance(engine.state.output, list):
                    engine.state.batch, engine.state.output = engine_apply_transform(
                        engine.state.batch, engine.state.output, posttrans)
                else:
                    for i, (b, o) in enumerate(zip(engine.state.batch, engine.state.output)):
                        engine.state.batch[i], engine.state.output[i] = engine_apply_transform(b, o, posttrans)
            except Exception as e:  # this case fails alone; metrics skip it (no output)
                source = engine.state.case_sources.pop() if engine.state.case_sources else "<in-memory>"
                message = f"{source}: writing its outputs failed: {root_cause(e)}"
                logger.error("case failed: %s", message)
                engine.state.case_failures.append({"source": source, "error": message})
                engine.state.output = None

    @staticmethod
    def _reset_cases(engine: RobustEvaluator) -> None:
        engine.state.case_failures = []
        engine.state.case_skipped = []
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
            skipped = batchdata.get(SKIPPED_KEY, [False] * len(batchdata[SOURCE_KEY]))
            for source, message, skip in zip(batchdata[SOURCE_KEY], batchdata[ERROR_KEY], skipped):
                (engine.state.case_skipped if skip else engine.state.case_failures).append(
                    {"source": source, "error" if not skip else "reason": message})
            last = engine.state.iteration == engine.state.epoch_length
            if last and engine.state.case_failures and not engine.state.case_sources:
                errors = "\n  ".join(f["error"] for f in engine.state.case_failures)
                raise CasesFailedError(f"all {len(engine.state.case_failures)} case(s) failed:\n  {errors}")
            return None
        engine.state.case_sources.extend(str(s) for s in self._sources(batchdata))
        return self._process(engine, batchdata)

    def _sources(self, batchdata: dict) -> list:
        """The files of a batch's cases: the image's ``filename_or_obj``, or the ``source_key`` values (e.g. the
        ``report`` of report datasets)."""
        if self.source_key is not None:
            return list(batchdata[self.source_key])
        image = batchdata.get("image")
        return getattr(image, "meta", {}).get("filename_or_obj", ["<in-memory>"] * len(image))

    def _process(self, engine: RobustEvaluator, batchdata: dict) -> dict | None:
        """One completed case: the plain ``SupervisedEvaluator`` iteration unless a subclass changes it."""
        super()._iteration(engine, batchdata)
        return engine.state.output  # None when its outputs could not be written
