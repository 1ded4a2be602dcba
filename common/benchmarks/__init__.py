"""Speed and memory measurement: the benchmarks of the ``benchmark`` command and the timing helper they and the
export reports share."""

from .csr import benchmark_csr
from .ct import CT_VIT_SIZES, benchmark_ct
from .iris import IRIS_SIZES, benchmark_iris
from .timing import peak_memory_mb, time_call
from .yolo import benchmark_yolo

__all__ = [
    "CT_VIT_SIZES",
    "IRIS_SIZES",
    "benchmark_csr",
    "benchmark_ct",
    "benchmark_iris",
    "benchmark_yolo",
    "peak_memory_mb",
    "time_call",
]
