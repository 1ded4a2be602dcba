"""ONNX export of a bundle's network, checked against PyTorch on the bundle's own sample, and int8 weights for CPU.

:func:`capture_network_inputs` runs ``configs/inference.json`` (with its own ``CheckpointLoader``, so the shipped
weights) on the embedded sample until the first call of ``network`` and keeps that call's tensors: the export is
traced on, and compared on, exactly what the bundle feeds its network, references and masks included.
:func:`export_onnx` writes the ONNX file with ``torch.onnx.export`` (the ``torch.export`` path first, the
TorchScript tracer where a network does not export that way), runs it in onnxruntime and reports the largest
difference per output beside both latencies. ``quantize="int8"`` adds onnxruntime's dynamic int8 quantisation of
the matrix multiplications (weights int8, activations quantised per call), which is where the transformer and
LSTM parts spend their time; convolutions stay fp32.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from monai.utils import convert_to_tensor

from common.benchmarks.timing import time_call

__all__ = ["OnnxExport", "OnnxNetwork", "capture_network_inputs", "export_onnx", "flatten_outputs", "run_onnx"]

logger = logging.getLogger(__name__)

# operators onnxruntime's dynamic quantiser rewrites to int8; convolutions are left alone because ConvInteger
# is slower than fp32 convolution here, and LSTMs because int8 recurrences drift over long reports
INT8_OPS = ("MatMul", "Gemm", "Attention")


class _Captured(Exception):
    """Stops the bundle's evaluator once the network's inputs are in hand."""


def capture_network_inputs(bundle_dir: str | Path, **override: Any) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Run the bundle's inference on its embedded sample up to the first call of its inferer.

    The workflow is ``configs/inference.json`` with ``output_dir`` in a temporary folder (nothing is written into
    the bundle); its handlers load ``ckpt_path`` as they do for inference, so the returned network carries the
    weights inference would use. Override ``ckpt_path``, ``queries`` and the like as on the command line.

    The inferer is called as ``inferer(inputs, network, *args, **kwargs)`` whatever method of the network it then
    uses (``explain``, ``encode``, ``segment``); its tensors are named by ``network.forward``'s parameters: the
    first takes ``inputs``, the next ones ``args``, keywords keep their names. An in-context evaluator's references
    (its ``prompt``) fill ``forward``'s remaining parameters, so IRIS exports as ``forward(image, ref_image,
    ref_mask)``.

    Args:
        bundle_dir: the bundle's root folder.
        override: config id -> value, as ``monai.bundle run`` takes them.

    Returns:
        ``(network, inputs)``: the network in eval mode on the CPU, and the tensors of that call keyed by the name
        of ``forward``'s parameter, e.g. ``{"image": (1, 1, 64, 64, 64), "ref_image": (1, R, 1, 64, 64, 64),
        "ref_mask": (1, R, K, 64, 64, 64)}`` for IRIS.

    Raises:
        RuntimeError: the inference ended without calling its inferer (e.g. no readable sample).
    """
    root = Path(bundle_dir).resolve()
    call: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = {"bundle_root": str(root), "output_dir": tmp, "device": "$torch.device('cpu')", **override}
        workflow = ConfigWorkflow(
            config_file=str(root / "configs" / "inference.json"),
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=None,
            workflow_type="infer",
            **settings,
        )
        workflow.initialize()
        evaluator = workflow.parser.get_parsed_content("evaluator")
        inferer = evaluator.inferer

        def capture(inputs, network, *args, **kwargs):
            call.update(inputs=inputs, args=args, kwargs=kwargs)
            raise _Captured

        evaluator.inferer = capture
        try:
            workflow.run()
        except Exception as e:  # engines and robust evaluators wrap what a step raises; look for ours in the chain
            cause = e
            while cause is not None and not isinstance(cause, _Captured):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
        finally:
            evaluator.inferer = inferer
        network = workflow.parser.get_parsed_content("network").cpu().eval()
        if not call:
            raise RuntimeError(f"{root.name}: inference ended without calling its inferer; is the sample readable?")
        params = [p for p in inspect.signature(network.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        values = dict(zip([p.name for p in params], (call["inputs"], *call["args"])))
        values.update(call["kwargs"])
        prompt = getattr(evaluator, "prompt", None)
        missing = [p.name for p in params if p.name not in values and p.default is inspect.Parameter.empty]
        if missing and hasattr(prompt, "load_references"):
            values.update(zip(missing, prompt.load_references(torch.device("cpu"))))
    # plain tensors: torch.export cannot trace MONAI's MetaTensor subclass, and ONNX has no metadata to carry
    inputs = {p.name: convert_to_tensor(values[p.name], track_meta=False).detach().cpu().clone() for p in params
              if isinstance(values.get(p.name), torch.Tensor)}
    return network, inputs


def flatten_outputs(output: Any) -> dict[str, torch.Tensor]:
    """Name a network's tensor outputs: a tensor is ``pred``, a mapping keeps its keys, a sequence ``pred_<i>``."""
    if isinstance(output, torch.Tensor):
        return {"pred": output}
    if isinstance(output, Mapping):
        return {str(k): v for k, v in output.items() if isinstance(v, torch.Tensor)}
    if isinstance(output, (tuple, list)):
        return {f"pred_{i}": v for i, v in enumerate(output) if isinstance(v, torch.Tensor)}
    raise TypeError(f"cannot export an output of type {type(output).__name__}")


class _Positional(torch.nn.Module):
    """Calls ``network`` with named inputs given positionally and returns its tensors as a tuple (ONNX's form)."""

    def __init__(self, network: torch.nn.Module, names: list[str]):
        super().__init__()
        self.network = network
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_outputs(self.network(**dict(zip(self.names, tensors)))).values())

    def state_dict(self, *args, **kwargs):
        # the TorchScript tracer detaches every state entry; extra state (IRIS's memory-bank class names) is not a
        # tensor and is not part of the graph
        state = super().state_dict(*args, **kwargs)
        return type(state)((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))


def run_onnx(path: str | Path, inputs: Mapping[str, torch.Tensor], threads: int | None = None) -> Callable:
    """An onnxruntime CPU session for ``path`` as a function of no arguments returning its outputs on ``inputs``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {node.name: inputs[node.name].numpy() for node in session.get_inputs()}
    return lambda: session.run(None, feed)


class OnnxNetwork(torch.nn.Module):
    """A bundle network whose ``forward`` runs an exported ONNX file in onnxruntime (CPU), for evaluating an export
    through the bundle's own configs, e.g. ``--network "{'_target_': 'common.bundle.export.OnnxNetwork', 'network':
    '@network_def', 'path': 'model_int8.onnx'}"``.

    ``forward`` takes the arguments of ``network.forward`` and returns what it does (a tensor for a single ``pred``
    output, else a dict by output name). Everything else (weights loading, buffers such as thresholds, methods such
    as a CRF's decoding) is the wrapped PyTorch network's, so load the same ``model.pt`` the file was exported from.

    Args:
        network: the PyTorch network the file was exported from.
        path: the ``.onnx`` file.
        threads: onnxruntime's intra-op threads; ``None`` for its default.
    """

    def __init__(self, network: torch.nn.Module, path: str | Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        self.network = network
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.output_names = [node.name for node in self.session.get_outputs()]
        self.signature = inspect.signature(network.forward)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        bound = self.signature.bind(*args, **kwargs).arguments
        device = next((v.device for v in bound.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        feed = {name: convert_to_tensor(bound[name], track_meta=False).detach().cpu().numpy()
                for name in self.input_names}
        outputs = [torch.from_numpy(o).to(device) for o in self.session.run(None, feed)]
        if self.output_names == ["pred"]:
            return outputs[0]
        return dict(zip(self.output_names, outputs))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("network"), name)


class OnnxExport(dict):
    """What :func:`export_onnx` did, as a JSON-ready mapping.

    Keys: ``path``, ``exporter`` (``"dynamo"`` or ``"torchscript"``), ``inputs`` (name -> shape),
    ``max_abs_diff`` (output name -> largest absolute difference from PyTorch), ``size_mb``, ``torch_ms`` and
    ``onnx_ms`` (median latency of one call, same inputs and threads) and their ratio ``onnx_speedup``
    (PyTorch / onnxruntime); with ``quantize="int8"`` also ``int8_path``, ``int8_max_abs_diff``, ``int8_size_mb``,
    ``int8_ms`` and ``int8_speedup`` (PyTorch / int8).
    """


def export_onnx(
    network: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    path: str | Path,
    dynamo: bool | None = None,
    opset_version: int = 18,
    quantize: str | None = None,
    repeats: int = 5,
    threads: int | None = None,
    dynamic_axes: Mapping[str, Sequence[int]] | None = None,
) -> OnnxExport:
    """Write ``network`` as ONNX traced on ``inputs``, and compare onnxruntime's outputs with PyTorch's on them.

    Args:
        network: the module, in eval mode; called as ``network(**inputs)``.
        inputs: name -> tensor, in the order of the ONNX graph's inputs.
        path: the ``.onnx`` file to write; an existing file is an error (nothing is replaced).
        dynamo: ``True`` for the ``torch.export`` exporter, ``False`` for the TorchScript tracer, ``None`` to try
            ``torch.export`` and fall back to tracing when the network does not export that way.
        opset_version: ONNX opset. Default 18.
        quantize: ``"int8"`` to also write ``<stem>_int8.onnx`` with dynamically quantised matrix multiplications.
        repeats: timed calls per latency (after one warm-up call); the median is reported.
        threads: intra-op threads for both runtimes during timing; ``None`` keeps each runtime's default.
        dynamic_axes: input or output name -> axes left free in the graph. Default: the batch axis of every input
            and output, and the length axis of ``(B, T)`` integer inputs (token ids and their masks), so one file
            serves any batch and any report length; spatial sizes stay those of the sample, as the bundle's
            preprocessing fixes them.

    Returns:
        An :class:`OnnxExport` report.

    Raises:
        FileExistsError: ``path`` (or the int8 file) exists.
        ValueError: ``quantize`` is not ``None`` or ``"int8"``.
    """
    path = Path(path)
    int8_path = path.with_name(f"{path.stem}_int8.onnx")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    for target in [path] + ([int8_path] if quantize else []):
        if target.exists():
            raise FileExistsError(f"{target} exists; remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)

    names = list(inputs)
    wrapper = _Positional(network.eval(), names).eval()
    args = tuple(inputs[n] for n in names)
    with torch.no_grad():
        expected = flatten_outputs(network(**inputs))
    output_names = list(expected)

    if dynamic_axes is None:
        dynamic_axes = {n: [0, 1] if t.ndim == 2 and not t.is_floating_point() else [0] for n, t in inputs.items()}
        dynamic_axes.update({n: [0] for n in output_names})
    axes = {n: {int(a): f"{n}_dim{a}" for a in dims} for n, dims in dynamic_axes.items()}
    for n, t in inputs.items():  # one length for all token inputs: the ids and their mask go together
        if t.ndim == 2 and not t.is_floating_point() and 1 in axes.get(n, {}):
            axes[n][1] = "tokens"
    for n in axes:
        if 0 in axes[n]:
            axes[n][0] = "batch"

    exporter = None
    for use_dynamo in ([True, False] if dynamo is None else [bool(dynamo)]):
        try:
            # torch.export specialises axes of size 1, so a free batch axis is traced on a batch of two
            doubled = use_dynamo and all(0 in axes.get(n, {}) for n in names)
            if use_dynamo:  # torch.export's form of the same axes; the wrapper's one parameter is *tensors
                dims = {label: torch.export.Dim(label) for a in axes.values() for label in a.values()}
                shapes = {"dynamic_shapes": (tuple({i: dims[label] for i, label in axes.get(n, {}).items()} or None
                                                   for n in names),)}
            torch.onnx.export(
                wrapper, tuple(torch.cat([a, a]) for a in args) if doubled else args, str(path), input_names=names,
                output_names=output_names, opset_version=opset_version, dynamo=use_dynamo,
                **(dict(external_data=False, **shapes) if use_dynamo else dict(dynamic_axes=axes)),
            )
            exporter = "dynamo" if use_dynamo else "torchscript"
            break
        except Exception as e:
            if dynamo is not None or not use_dynamo:
                raise
            # torch.export refuses some data-dependent Python control flow that the tracer records as constants
            logger.info("torch.export could not export %s (%s); tracing instead", type(network).__name__, e)
            path.unlink(missing_ok=True)

    report = OnnxExport(path=str(path), exporter=exporter, inputs={n: list(t.shape) for n, t in inputs.items()})
    session = run_onnx(path, inputs, threads)
    report["max_abs_diff"] = _max_abs_diff(expected, session())
    report["size_mb"] = round(path.stat().st_size / 2**20, 2)

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with torch.no_grad():
            report["torch_ms"] = time_call(lambda: network(**inputs), repeats=repeats)["median_ms"]
    finally:
        torch.set_num_threads(previous_threads)
    report["onnx_ms"] = time_call(session, repeats=repeats)["median_ms"]
    report["onnx_speedup"] = round(report["torch_ms"] / report["onnx_ms"], 2)

    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(int8_path), weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OPS))
        int8_session = run_onnx(int8_path, inputs, threads)
        report["int8_path"] = str(int8_path)
        report["int8_max_abs_diff"] = _max_abs_diff(expected, int8_session())
        report["int8_size_mb"] = round(int8_path.stat().st_size / 2**20, 2)
        report["int8_ms"] = time_call(int8_session, repeats=repeats)["median_ms"]
        report["int8_speedup"] = round(report["torch_ms"] / report["int8_ms"], 2)
    return report


def _max_abs_diff(expected: Mapping[str, torch.Tensor], actual: list[np.ndarray]) -> dict[str, float]:
    """Largest absolute difference per output name (``inf`` where the shapes differ)."""
    diffs = {}
    for (name, want), got in zip(expected.items(), actual):
        want = want.detach().float().numpy()
        got = np.asarray(got, dtype=np.float32)
        diffs[name] = float(np.abs(want - got).max()) if want.shape == got.shape else float("inf")
    return diffs
