from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ignite.engine import Engine, Events

__all__ = ["CaseReportWriter"]

logger = logging.getLogger(__name__)


class CaseReportWriter:
    """Write which cases of a run completed and which failed (with the reason) to a JSON file.

    Reads ``state.case_sources`` and ``state.case_failures`` kept by ``InContextEvaluator`` and logs a summary;
    a run with failures still writes every completed case's outputs, and a run that stops with an exception
    still writes the report before the exception propagates.

    Args:
        output_dir: folder of the report.
        filename: report name. Default ``run_report.json``.
    """

    def __init__(self, output_dir: str | os.PathLike, filename: str = "run_report.json") -> None:
        self.path = Path(output_dir) / filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def _on_exception(self, engine: Engine, error: Exception) -> None:
        # a run that stops (e.g. every case failed) still tells the user which cases failed and why;
        # ignite re-raises only when no handler is attached, so re-raise here
        self(engine)
        raise error

    def __call__(self, engine: Engine) -> None:
        done = list(getattr(engine.state, "case_sources", []))
        failed = list(getattr(engine.state, "case_failures", []))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        report = {"completed": done, "failed": failed, "classes": getattr(engine.state, "class_names", [])}
        self.path.write_text(json.dumps(report, indent=4))
        if failed:
            logger.error("%d case(s) failed, %d completed; see %s", len(failed), len(done), self.path)
            for f in failed:
                logger.error("  %s", f["error"])
        else:
            logger.info("%d case(s) completed; report in %s", len(done), self.path)
