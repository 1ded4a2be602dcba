"""multi_gpu_train.json under torchrun (2 CPU processes, gloo), MLflow tracking, and the benchmark command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from common.data import generate_synthetic_3d
from tests.bundles.runner import torchrun_bundle
from tests.bundles.test_iris_bundle import BUNDLE, bundle_run

SMALL = ["--image_size", "[32,32,32]", "--max_epochs", "1", "--episodes_per_epoch", "4", "--val_interval", "1"]
pytestmark = pytest.mark.xdist_group(name="iris_distributed")
# loaded by every process of the run (PYTHONPATH): each rank appends the class ids of its own episode at every
# training iteration to EPISODE_LOG, before the memory bank handler gathers the ranks' episodes
RECORDER = '''
import json
import os

if os.environ.get("EPISODE_LOG"):
    from common.handlers import memory_bank

    _update = memory_bank.MemoryBankUpdater.__call__

    def _record(self, engine):
        batch = engine.state.batch
        ids = [b["class_ids"] for b in batch] if isinstance(batch, list) else list(batch["class_ids"])
        with open(os.environ["EPISODE_LOG"], "a") as log:
            log.write(json.dumps({"rank": int(os.environ.get("RANK", "0")),
                                  "class_ids": [int(c) for i in ids for c in i.flatten()]}) + "\\n")
        return _update(self, engine)

    memory_bank.MemoryBankUpdater.__call__ = _record
'''


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic_3d(out, num_cases=8, shape=(48, 48, 32), seed=5, split=(0.5, 0.25, 0.25))
    return out


def test_multi_gpu_train_runs_under_torchrun_on_cpu(synth, tmp_path, monkeypatch):
    recorder = tmp_path / "recorder"
    recorder.mkdir()
    (recorder / "sitecustomize.py").write_text(RECORDER)
    episodes = tmp_path / "episodes.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(recorder), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("EPISODE_LOG", str(episodes))
    # 8 labelled episodes (no random ones, which carry no class): 4 iterations per rank, each with classes
    torchrun_bundle(BUNDLE, "--dataset_dir", str(synth), "--ckpt_dir", str(tmp_path / "models"),
                    "--output_dir", str(tmp_path / "eval"), "--image_size", "[32,32,32]", "--max_epochs", "1",
                    "--episodes_per_epoch", "8", "--val_interval", "1", "--random_episode_fraction", "0")
    # rank 0 alone writes checkpoints
    assert [p.name for p in (tmp_path / "models").glob("*checkpoint*.pt")] == ["checkpoint_epoch=1.pt"]
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=False)
    counts = state["memory_bank.counts"].tolist()

    # each rank's own episode classes per iteration, as recorded in that rank
    seen = {0: [], 1: []}
    for line in episodes.read_text().splitlines():
        record = json.loads(line)
        seen[record["rank"]].append({c for c in record["class_ids"] if c >= 0})
    assert [len(v) for v in seen.values()] == [4, 4] and all(any(v) for v in seen.values()), seen

    def bank_counts(*ranks: int) -> list[int]:  # one update per class and iteration, from these ranks' episodes
        out = [0] * len(counts)
        for step in zip(*(seen[r] for r in ranks)):
            for c in set().union(*step):
                out[c] += 1
        return out

    # rank 0's saved bank holds the classes of both ranks' episodes, gathered every iteration: not rank 0's alone
    assert counts == bank_counts(0, 1) != bank_counts(0), (counts, seen)


def test_mlflow_tracking_through_the_runner(synth, tmp_path):
    bundle_run(
        "train.json", "--dataset_dir", str(synth), "--ckpt_dir", str(tmp_path / "models"),
        "--output_dir", str(tmp_path / "eval"), "--tracking", "mlflow", *SMALL,
    )
    assert (tmp_path / "eval" / "mlruns.db").stat().st_size > 0


def test_benchmark_command_prints_figures():
    cmd = [sys.executable, "-m", "common.cli", "benchmark", "iris", "--image_size", "16", "--num_classes", "2",
           "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["network"] == "iris_small" and result["params_m"] == pytest.approx(0.616, abs=0.01)
    assert result["latency_s"] > 0 and result["peak_memory_mb"] > 0
