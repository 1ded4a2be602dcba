"""Speed and memory measurement shared by the benchmarks and the export reports."""

from .timing import peak_memory_mb, time_call

__all__ = ["peak_memory_mb", "time_call"]
