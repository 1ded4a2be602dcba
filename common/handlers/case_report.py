"""The per-run report of which cases completed, were skipped or failed."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from ignite.engine import Engine, Events

from common.bundle.args import user_error

__all__ = ["CaseReportWriter", "keep_earlier"]

logger = logging.getLogger(__name__)


def keep_earlier(path: Path) -> Path | None:
    """Move an existing ``path`` aside as ``<stem>_<its modification time><suffix>`` (``_2``, ``_3``... when taken),
    so a run's summary file never replaces an earlier run's; returns where it went, ``None`` when absent."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    target, n = path.with_name(f"{path.stem}_{stamp}{path.suffix}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.stem}_{stamp}_{n}{path.suffix}")
    path.rename(target)
    return target


class CaseReportWriter:
    """Write which cases of a run completed, which were skipped (their outputs exist and ``overwrite`` is off) and
    which failed (with the reason) to a JSON file.

    Reads ``state.case_sources``, ``state.case_skipped`` and ``state.case_failures`` kept by ``RobustEvaluator`` and
    logs a summary; a run with failures still writes every completed case's outputs, and a run that stops with an
    exception still writes the report before the exception propagates. A report of an earlier run in the same
    folder is kept, renamed ``<stem>_<its time>.json``.

    Args:
        output_dir: folder of the report.
        filename: report name. Default ``run_report.json``.
    """

    def __init__(self, output_dir: str | os.PathLike, filename: str = "run_report.json") -> None:
        self.path = Path(output_dir) / filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._check_writable)
        engine.add_event_handler(Events.COMPLETED, self)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def _check_writable(self, engine: Engine) -> None:
        """Refuse a run whose output folder cannot be written before its first case, not after each one."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise user_error(f"output folder {folder} is not writable: {e.strerror or e}", PermissionError) from None

    def _on_exception(self, engine: Engine, error: Exception) -> None:
        # a run that stops (e.g. every case failed) still tells the user which cases failed and why;
        # ignite re-raises only when no handler is attached, so re-raise here
        if not isinstance(error, PermissionError):
            self(engine)
        raise error

    def __call__(self, engine: Engine) -> None:
        done = list(getattr(engine.state, "case_sources", []))
        failed = list(getattr(engine.state, "case_failures", []))
        skipped = list(getattr(engine.state, "case_skipped", []))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._keep_earlier_report()
        report = {"completed": done, "skipped": skipped, "failed": failed,
                  "classes": getattr(engine.state, "class_names", [])}
        self.path.write_text(json.dumps(report, indent=4))
        if skipped:
            logger.warning("%d case(s) skipped: their outputs exist (set overwrite to true to replace them)",
                           len(skipped))
        if failed:
            logger.error("%d case(s) failed, %d completed; see %s", len(failed), len(done), self.path)
            for f in failed:
                logger.error("  %s", f["error"])
        else:
            logger.info("%d case(s) completed; report in %s", len(done), self.path)

    def _keep_earlier_report(self) -> None:
        keep_earlier(self.path)
