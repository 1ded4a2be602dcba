"""The IRIS, CSR and CT-ViT benchmarks at tiny settings: the figures they report and the arguments they refuse."""

from __future__ import annotations

import pytest

from common.benchmarks import benchmark_csr, benchmark_ct, benchmark_iris

SETTING_KEYS = {"network", "params_m", "image_size", "batch_size", "device", "mode", "peak_memory_mb", "latency_s"}

TEST_CASES = [
    [benchmark_iris, {"image_size": 16, "num_classes": 2, "repeats": 1}, {"classes", "references", "amp_bf16"}],
    [benchmark_iris, {"image_size": 16, "repeats": 1, "train": True, "amp": "true"},
     {"amp_bf16", "fp32_latency_s", "amp_speedup"}],
    [benchmark_iris, {"image_size": 16, "num_references": 3, "repeats": 1, "amp": True, "cached_references": "true",
                      "channels_last": True}, {"reference_encoding_s", "amp_speedup", "channels_last"}],
    [benchmark_csr, {"image_size": 32, "batch_size": 2, "repeats": 1}, {"images_per_s", "amp_bf16"}],
    [benchmark_csr, {"image_size": 32, "batch_size": 2, "repeats": 1, "train": True}, {"images_per_s"}],
]


@pytest.mark.parametrize("benchmark, kwargs, extra_keys", TEST_CASES)
def test_benchmark_reports_the_setting_and_positive_figures(benchmark, kwargs, extra_keys):
    result = benchmark(**kwargs)
    assert SETTING_KEYS | extra_keys <= set(result)
    assert result["latency_s"] > 0 and result["peak_memory_mb"] > 0
    if "amp_speedup" in result:  # the ratio is the two medians' quotient, within what rounding each to 0.1 ms allows
        fp32, amp, half_step = result["fp32_latency_s"], result["latency_s"], 5e-5
        low, high = (fp32 - half_step) / (amp + half_step), (fp32 + half_step) / max(amp - half_step, 1e-9)
        assert low - 0.005 <= result["amp_speedup"] <= high + 0.005
    if "images_per_s" in result:
        assert result["batch_size"] / result["images_per_s"] == pytest.approx(result["latency_s"], abs=1e-4)


def test_iris_amp_alone_leaves_out_the_fp32_run():
    # --compare_fp32 false (the string, as the CLI passes it): bf16 only, so the peak is bf16's and no ratio is made
    result = benchmark_iris(image_size=16, repeats=1, amp=True, cached_references=True, compare_fp32="false")
    assert result["amp_bf16"] and result["latency_s"] > 0
    assert "amp_speedup" not in result and "fp32_latency_s" not in result
    # the process before the network existed is part of the CPU peak, never more than it
    assert 0 < result["process_start_mb"] <= result["peak_memory_mb"]


def test_ct_benchmark_reports_one_row_per_size():
    rows = benchmark_ct(size="tiny", repeats=1)["results"]
    assert [r["network"] for r in rows] == ["ct_vit_tiny"] and rows[0]["tokens_per_volume"] == 64
    assert 64 / rows[0]["tokens_per_s"] == pytest.approx(rows[0]["latency_s"], abs=1e-4)


ILL_CASES = [[benchmark_iris, {"size": "huge"}], [benchmark_ct, {"size": "tiny,huge"}]]


def test_iris_benchmark_times_cached_references_for_forward_passes_only():
    with pytest.raises(ValueError, match="cached_references times forward passes only"):
        benchmark_iris(image_size=16, repeats=1, train=True, cached_references=True)


@pytest.mark.parametrize("benchmark, kwargs", ILL_CASES)
def test_benchmark_refuses_an_unknown_size(benchmark, kwargs):
    with pytest.raises(ValueError, match="size should be"):
        benchmark(**kwargs)
