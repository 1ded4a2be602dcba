"""Every bundle's network exports to ONNX and onnxruntime reproduces PyTorch on the bundle's own sample.

The inputs are what each bundle's inference feeds its network on its embedded sample, with the shipped weights;
a second call with twice the batch (and, for reports, another length) checks that the file is not tied to the
traced shapes. Differences are taken relative to the largest output and asserted below 1e-4; the bundles' docs
list the absolute ones.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.bundle.export import OnnxNetwork, capture_network_inputs, export_onnx, flatten_outputs, run_onnx

from .test_conventions import BUNDLES, BUNDLES_DIR

# smaller grids where the sample's would only slow the test: the graph is the same
OVERRIDES = {"iris_incontext_segmentation": {"image_size": [32, 32, 32]}}
# the exporter ``dynamo=None`` ends up with for each network (torch.export refuses the CT encoder's and the
# labeler's data-dependent control flow); the test asks for it directly, the fallback is tested by the command test
EXPORTERS = {"csr_cxr_classification": "dynamo", "ct_report_encoder": "torchscript",
             "cxr_report_labeler": "torchscript", "iris_incontext_segmentation": "dynamo",
             "yolo_cxr_detection": "dynamo"}
RELATIVE_TOLERANCE = 1e-4


def _relative_diffs(expected: dict[str, torch.Tensor], actual: list[np.ndarray]) -> dict[str, float]:
    return {
        name: float(np.abs(want.numpy() - got).max() / max(float(want.abs().max()), 1e-6))
        for (name, want), got in zip(expected.items(), actual)
    }


def _second_draw(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Batch of two (the sample and its mirror image); token inputs also shorter by a few tokens."""
    second = {}
    for name, value in inputs.items():
        if value.ndim == 2 and not value.is_floating_point():
            second[name] = value.repeat(2, 1)[:, : max(value.shape[1] - 5, 4)]
        else:
            second[name] = torch.cat([value, value.flip(-1)])
    return second


@pytest.mark.parametrize("bundle_dir", BUNDLES)
def test_onnx_matches_pytorch_on_the_sample(bundle_dir, tmp_path):
    torch.manual_seed(0)
    network, inputs = capture_network_inputs(bundle_dir, **OVERRIDES.get(bundle_dir.name, {}))
    exporter = EXPORTERS[bundle_dir.name]
    report = export_onnx(network, inputs, tmp_path / "model.onnx", dynamo=exporter == "dynamo", repeats=1, threads=1)

    assert report["exporter"] == exporter
    assert report["inputs"] == {n: list(t.shape) for n, t in inputs.items()}
    with torch.no_grad():
        expected = flatten_outputs(network(**inputs))
    assert list(report["max_abs_diff"]) == list(expected)
    relative = _relative_diffs(expected, run_onnx(tmp_path / "model.onnx", inputs)())
    assert max(relative.values()) < RELATIVE_TOLERANCE, relative

    second = _second_draw(inputs)
    with torch.no_grad():
        expected = flatten_outputs(network(**second))
    relative = _relative_diffs(expected, run_onnx(tmp_path / "model.onnx", second)())
    assert max(relative.values()) < RELATIVE_TOLERANCE, relative
    assert report["torch_ms"] > 0 and report["onnx_ms"] > 0


def test_onnx_network_stands_in_for_the_pytorch_one(tmp_path):
    """The labeler's ONNX file behind ``OnnxNetwork``: same dict of outputs, the CRF decoding still the network's."""
    network, inputs = capture_network_inputs(BUNDLES_DIR / "cxr_report_labeler")
    export_onnx(network, inputs, tmp_path / "model.onnx", dynamo=False, repeats=1)
    onnx_network = OnnxNetwork(network, tmp_path / "model.onnx")
    with torch.no_grad():
        want = network(inputs["input_ids"], inputs["attention_mask"])
    got = onnx_network(inputs["input_ids"], inputs["attention_mask"])
    assert set(got) == set(want)
    torch.testing.assert_close(got["logits"], want["logits"], atol=1e-4, rtol=1e-4)
    assert onnx_network.decode_tags(got["emissions"], inputs["attention_mask"]) == network.decode_tags(
        want["emissions"], inputs["attention_mask"])
    state = network.state_dict()
    onnx_network.load_state_dict(state)  # loads into the wrapped network, as a CheckpointLoader would
    torch.testing.assert_close(onnx_network.thresholds, network.thresholds)


def test_int8_quantisation_writes_a_smaller_file_close_to_fp32(tmp_path):
    network, inputs = capture_network_inputs(BUNDLES_DIR / "ct_report_encoder")
    report = export_onnx(network, inputs, tmp_path / "model.onnx", dynamo=False, quantize="int8", repeats=1)
    assert report["int8_size_mb"] < report["size_mb"]
    with torch.no_grad():
        expected = flatten_outputs(network(**inputs))
    relative = _relative_diffs(expected, run_onnx(report["int8_path"], inputs)())
    # int8 weights: measured 0.9 % of the largest embedding value; fp32 export 2e-7
    assert 1e-5 < max(relative.values()) < 0.05, relative
    with pytest.raises(FileExistsError, match="model.onnx exists"):
        export_onnx(network, inputs, tmp_path / "model.onnx")


def test_export_onnx_command(repo_root, tmp_path):
    out = tmp_path / "onnx"
    command = [sys.executable, "-m", "common.cli", "export_onnx", "ct_report_encoder", "--out", str(out),
               "--repeats", "1"]
    done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "export_report.json").read_text())
    assert report["bundle"] == "ct_report_encoder" and (out / "model.onnx").is_file()
    assert report["exporter"] == "torchscript"  # after torch.export refused the network
    assert max(report["max_abs_diff"].values()) < 1e-3
    before = (out / "model.onnx").read_bytes()
    again = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0
    assert "exist(s); pass --overwrite true" in again.stderr.strip().splitlines()[-1]
    assert (out / "model.onnx").read_bytes() == before
