"""inference_trt.json: MONAI's ``trt_compile`` on a bundle's weight-bearing submodule, listed after inference.json.

Without TensorRT and a GPU, ``trt_compile`` leaves the network as it is (and says so), so here the merged config
must resolve to the same network the plain config builds, with the compiled submodule present; what TensorRT makes
of it is measured by ``make gpu-check`` on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
TRT = {"csr_cxr_classification": ["backbone"], "iris_incontext_segmentation": ["encoder"]}


@pytest.mark.parametrize("name, submodules", sorted(TRT.items()))
def test_trt_config_resolves_to_the_plain_network_without_tensorrt(name, submodules):
    bundle = BUNDLES / name
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in ("inference.json", "inference_trt.json")])
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
    assert "from monai.networks import trt_compile" in " ".join(parser["imports"])
    assert any("import torch" in i for i in parser["imports"])  # "+imports" adds to the plain config's, not replaces
    network = parser.get_parsed_content("network")
    plain = ConfigParser()
    plain.read_config(str(bundle / "configs" / "inference.json"))
    plain.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
    assert type(network) is type(plain.get_parsed_content("network"))
    for sub in submodules:
        module = network.get_submodule(sub)
        assert isinstance(module, torch.nn.Module) and any(p.numel() for p in module.parameters())
        assert not hasattr(module, "_trt_compiler") or torch.cuda.is_available()
