from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import densenet121, resnet18

from common.losses.prototype_contrastive import PrototypeContrastiveLoss
from common.networks.backbones import BACKBONES, build_backbone, load_backbone_weights
from common.networks.csr import CSRNet, csr_densenet121, csr_resnet50, csr_tiny, csr_vit_b16

SMALL = {"num_concepts": 3, "prototypes_per_concept": 2, "num_classes": 4}

# [factory, kwargs, image shape, (F, h, w)]
TEST_CASES = [
    [csr_tiny, SMALL, (2, 1, 64, 64), (32, 8, 8)],
    [csr_tiny, {**SMALL, "in_channels": 3, "cam_pool": "max"}, (2, 3, 64, 48), (32, 8, 6)],
    [CSRNet, {**SMALL, "backbone": "resnet18", "proj_hidden": 32, "proj_dim": 16}, (2, 1, 64, 64), (512, 2, 2)],
    [CSRNet, {**SMALL, "backbone": "resnet18_os16", "proj_hidden": 32, "proj_dim": 16}, (2, 1, 64, 64), (256, 4, 4)],
    [csr_densenet121, {**SMALL, "proj_hidden": 32, "proj_dim": 16}, (2, 1, 32, 32), (1024, 1, 1)],
    [csr_vit_b16, {**SMALL, "proj_hidden": 32, "proj_dim": 16}, (1, 1, 224, 224), (768, 14, 14)],
]

# constructor kwargs for csr_tiny that raise ValueError, the error message's start
ILL_CASES = [
    [{"num_concepts": 0}, "num_concepts should be"],
    [{"prototypes_per_concept": 0}, "prototypes_per_concept should be"],
    [{"num_classes": 0}, "num_classes should be"],
    [{"proj_dim": 2.5}, "proj_dim should be"],
    [{"in_channels": 0}, "in_channels should be"],
    [{"cam_pool": "median"}, "Unsupported option 'median'"],
    [{"roi_mode": "mask"}, "Unsupported option 'mask'"],
    [{"lse_r": 0.0}, "lse_r should be"],
    [{"attention_temperature": -1.0}, "attention_temperature should be"],
    [{"training_stage": 4}, "'4' is not a valid value"],
    [{"backbone": "vgg16"}, "Unsupported option 'vgg16'"],
    [{"backbone_channels": 64}, "backbone_channels should be 32 for tiny"],  # the tiny backbone gives 32
    [{"backbone": nn.Identity()}, "backbone_channels should be a positive integer for a module backbone"],
    [{"backbone": 3}, "backbone should be a backbone name or an nn.Module"],
]


def _net(**kwargs) -> CSRNet:
    torch.manual_seed(0)
    return csr_tiny(**{**SMALL, **kwargs}).eval()


def _image(b: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(b, 1, 64, 64)


@pytest.mark.parametrize("factory, kwargs, image_shape, fhw", TEST_CASES)
def test_explain_shapes(factory, kwargs, image_shape, fhw):
    torch.manual_seed(0)
    net = factory(**kwargs).eval()
    k, m, c = kwargs["num_concepts"], kwargs["prototypes_per_concept"], kwargs["num_classes"]
    d = net.prototypes.shape[1]
    b, (f, h, w) = image_shape[0], fhw
    with torch.no_grad():
        out = net.explain(torch.rand(*image_shape))
    expected = {
        "logits": (b, c),
        "similarity_scores": (b, k * m),
        "similarity_maps": (b, k * m, h, w),
        "cams": (b, k, h, w),
        "features": (b, f, h, w),
        "projected_features": (b, d, h, w),
        "concept_logits": (b, k),
    }
    assert {key: tuple(v.shape) for key, v in out.items()} == expected
    assert all(torch.isfinite(v).all() for v in out.values())
    assert net.feature_channels == f


def test_factories_pick_their_backbone():
    assert csr_resnet50(**SMALL).feature_channels == 2048
    assert {name: spec[1] for name, spec in BACKBONES.items()} == {
        "densenet121": 1024, "resnet50": 2048, "resnet18": 512, "resnet18_os16": 256, "vit_b_16": 768, "tiny": 32
    }


def test_module_backbone():
    backbone = nn.Sequential(nn.Conv2d(1, 12, 3, stride=4, padding=1), nn.ReLU())
    net = CSRNet(backbone, backbone_channels=12, proj_hidden=8, proj_dim=8, **SMALL).eval()
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 4)


def test_forward_is_explain_logits():
    net, image = _net(), _image()
    with torch.no_grad():
        torch.testing.assert_close(net(image), net.explain(image)["logits"])


def test_similarity_maps_are_cosine_and_scores_their_max():
    net = _net()
    with torch.no_grad():
        out = net.explain(_image())
    proj, maps = out["projected_features"], out["similarity_maps"]
    for b, p, i, j in [(0, 0, 0, 0), (1, 5, 3, 7), (0, 3, 7, 2)]:
        expected = F.cosine_similarity(proj[b, :, i, j], net.prototypes[p], dim=0)
        torch.testing.assert_close(maps[b, p, i, j], expected)
    torch.testing.assert_close(out["similarity_scores"], maps.flatten(2).amax(-1))
    torch.testing.assert_close(out["logits"], net.task_head(out["similarity_scores"]))


def test_local_concept_vectors_by_hand_on_2x2():
    net = _net(num_concepts=1)
    cams = torch.tensor([[[[0.0, math.log(2.0)], [math.log(3.0), 0.0]]]])  # softmax weights (1, 2, 3, 1) / 7
    projected = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, -1.0], [1.0, 0.0]]]])  # (1, D=2, 2, 2)
    expected = torch.tensor([[[(1 * 1 + 2 * 2 + 3 * 3 + 1 * 4) / 7, (1 * 0 + 2 * -1 + 3 * 1 + 1 * 0) / 7]]])
    torch.testing.assert_close(net.local_concept_vectors(cams, projected), expected)
    # temperature 2: weights proportional to (1, sqrt 2, sqrt 3, 1)
    net.attention_temperature = 2.0
    w = torch.tensor([1.0, math.sqrt(2.0), math.sqrt(3.0), 1.0])
    w = w / w.sum()
    expected = torch.stack([(w * projected[0, c].flatten()).sum() for c in range(2)]).view(1, 1, 2)
    torch.testing.assert_close(net.local_concept_vectors(cams, projected), expected)


@pytest.mark.parametrize("cam_pool", ["lse", "max", "avg"])
def test_cam_pooling_by_hand(cam_pool):
    net = _net(cam_pool=cam_pool, lse_r=2.0)
    cams = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]])
    values = [0.0, 1.0, 2.0, -1.0]
    expected = {
        "lse": math.log(sum(math.exp(2.0 * v) for v in values) / 4) / 2.0,
        "max": 2.0,
        "avg": 0.5,
    }[cam_pool]
    assert net.pool_cams(cams).item() == pytest.approx(expected, rel=1e-6)


def test_roi_restrict():
    net, image = _net(), _image()
    with torch.no_grad():
        full = net.explain(image)
        maps = full["similarity_maps"]
        # ROI on the feature grid: one cell that is not prototype 0's best location in image 0
        best = int(maps[0, 0].flatten().argmax())
        cell = (best + 1) % 64
        roi = torch.zeros(2, 1, 8, 8)
        roi.view(2, -1)[:, cell] = 1.0
        out = net.explain(image, roi)
        torch.testing.assert_close(out["similarity_scores"], maps.flatten(2)[:, :, cell])
        assert out["similarity_scores"][0, 0] < full["similarity_scores"][0, 0]
        assert not torch.allclose(out["logits"], full["logits"])
        # ROI at image size: one pixel already selects its whole stride-8 cell (any overlap counts)
        roi = torch.zeros(1, 1, 64, 64)
        roi[0, 0, 9, 20] = 1.0
        torch.testing.assert_close(net.explain(image, roi)["similarity_scores"], maps[:, :, 1, 2])
        # an all-ones ROI changes nothing
        torch.testing.assert_close(net.explain(image, torch.ones(2, 1, 64, 64))["logits"], full["logits"])


def test_roi_weight():
    net, image = _net(roi_mode="weight"), _image()
    torch.manual_seed(2)
    roi = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        maps = net.explain(image)["similarity_maps"]
        out = net.explain(image, roi)
    torch.testing.assert_close(out["similarity_scores"], (maps * roi).flatten(2).amax(-1))
    # image-size ROI: area resize gives each cell its covered fraction
    roi = torch.zeros(2, 1, 64, 64)
    roi[:, :, :8, :4] = 1.0  # half of cell (0, 0)
    with torch.no_grad():
        torch.testing.assert_close(net.explain(image, roi)["similarity_scores"], (maps[:, :, 0, 0] * 0.5).clamp_min(0))
    net.set_roi_mode("restrict")
    assert net.roi_mode == "restrict"


@pytest.mark.parametrize("roi_mode", ["restrict", "weight"])
def test_ill_roi(roi_mode):
    net, image = _net(roi_mode=roi_mode), _image()
    roi = torch.ones(2, 1, 64, 64)
    roi[1] = 0.0
    with pytest.raises(ValueError, match="empty"):
        net(image, roi)
    for shape in [(2, 2, 64, 64), (3, 1, 64, 64), (2, 64, 64)]:
        with pytest.raises(ValueError, match="roi_mask should have shape"):
            net(image, torch.ones(shape))


def test_concept_intervention_follows_the_linear_head():
    net, image = _net(), _image()
    m = net.prototypes_per_concept
    with torch.no_grad():
        base = net.explain(image)
        net.set_concept_intervention(off=[0], on=[2])
        out = net.explain(image)
    new_scores = base["similarity_scores"].clone()
    new_scores[:, 0:m], new_scores[:, 2 * m:3 * m] = 0.0, 1.0
    torch.testing.assert_close(out["similarity_scores"], new_scores)
    w = net.task_head.weight.detach()
    delta = torch.zeros_like(base["logits"])
    for k in (0, 2):
        cols = slice(k * m, (k + 1) * m)
        delta += (new_scores[:, cols] - base["similarity_scores"][:, cols]) @ w[:, cols].T
    torch.testing.assert_close(out["logits"] - base["logits"], delta)
    assert net.state_dict()["concept_intervention"].tolist() == [-1, 0, 1]
    net.clear_intervention()
    with torch.no_grad():
        torch.testing.assert_close(net(image), base["logits"])
    for off, on, message in [([3], [], "off should hold concept indices"), ([], [-1], "on should hold concept indices"),
                             ([1], [1], "off and on should not share")]:
        with pytest.raises(ValueError, match=message):
            net.set_concept_intervention(off=off, on=on)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())


def _stage_step(net: CSRNet, stage: int) -> dict[str, bool]:
    """One SGD step on the stage's loss; which parts stayed bit-identical."""
    net.freeze_stage(stage)
    net.train()
    parts = ["backbone", "concept_head", "projector", "task_head"]
    before = {p: _snapshot(getattr(net, p)) for p in parts}
    prototypes = net.prototypes.detach().clone()
    opt = torch.optim.SGD(net.trainable_parameters(), lr=0.5)
    torch.manual_seed(3)
    image, present = torch.rand(4, 1, 64, 64), (torch.rand(4, 3) > 0.5).float()
    out = net.explain(image)
    if stage == 1:
        loss = F.binary_cross_entropy_with_logits(out["concept_logits"], present)
    elif stage == 2:
        vectors = net.local_concept_vectors(out["cams"], out["projected_features"])
        loss = PrototypeContrastiveLoss()(vectors, net.prototypes, present)
    else:
        loss = F.cross_entropy(out["logits"], torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    same = {p: _same(getattr(net, p), before[p]) for p in parts}
    same["prototypes"] = torch.equal(net.prototypes, prototypes)
    return same


@pytest.mark.parametrize(
    "stage, trained",
    [
        (1, {"backbone", "concept_head"}),
        (2, {"projector", "prototypes"}),
        (3, {"task_head"}),
    ],
)
def test_freeze_stage_trains_only_its_parts(stage, trained):
    net = _net()
    same = _stage_step(net, stage)
    assert {part for part, unchanged in same.items() if not unchanged} == trained
    frozen_modules = {"backbone", "concept_head", "projector", "task_head"} - trained
    assert all(not getattr(net, p).training for p in frozen_modules)
    assert all(getattr(net, p).training for p in trained - {"prototypes"})
    assert {id(p) for p in net.trainable_parameters()} == {
        id(p) for p in net.parameters() if p.requires_grad
    }


def test_frozen_parts_stay_in_eval_and_stage_zero_trains_all():
    net = csr_tiny(**SMALL, training_stage=2)
    assert net.training_stage == 2 and net.prototypes.requires_grad
    net.eval().train()
    assert not net.backbone.training and not net.concept_head.training and net.projector.training
    assert not any(p.requires_grad for p in net.backbone.parameters())
    net.freeze_stage(0)
    net.train()
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())


def test_kmeans_init_finds_cluster_centres():
    net = _net(num_concepts=3, prototypes_per_concept=2)
    d = net.prototypes.shape[1]
    torch.manual_seed(4)
    directions = torch.linalg.qr(torch.randn(d, d))[0].T[:6]  # orthonormal cluster directions
    n = 60
    present = torch.ones(n, 3)
    present[:, 2] = 0.0
    present[0, 2] = 1.0  # concept 2 present once: fewer than M samples
    present[n // 2:, 1] = 0.0
    cluster = torch.arange(n) % 2  # which of its two clusters each image's vector comes from
    vectors = torch.zeros(n, 3, d)
    for k in range(3):
        vectors[:, k] = 3.0 * (directions[2 * k + cluster] + 0.02 * torch.randn(n, d))
    before = net.prototypes.detach().clone()
    net.init_prototypes_kmeans(vectors, present, seed=0)
    for k in range(2):
        rows = present[:, k] > 0
        unit = F.normalize(vectors[rows, k], dim=-1)
        centres = torch.stack([unit[cluster[rows] == c].mean(0) for c in range(2)])
        got = net.prototypes[2 * k:2 * k + 2].detach()
        order = torch.cdist(got, centres).argmin(1)
        assert sorted(order.tolist()) == [0, 1]
        torch.testing.assert_close(got, centres[order])
    torch.testing.assert_close(net.prototypes[4:6].detach(), before[4:6])
    first = net.prototypes.detach().clone()
    net.init_prototypes_kmeans(vectors, present, seed=0)
    assert torch.equal(net.prototypes.detach(), first)
    with pytest.raises(ValueError, match="local_vectors should have shape"):
        net.init_prototypes_kmeans(vectors[:, :2], present[:, :2])
    with pytest.raises(ValueError, match="concept_present should have shape"):
        net.init_prototypes_kmeans(vectors, present[:10])


def test_weights_path_with_prefix_sums_rgb_stem(tmp_path):
    torch.manual_seed(5)
    source = resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18_rgb.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    net = CSRNet("resnet18", in_channels=1, weights_path=path, proj_hidden=8, proj_dim=8, **SMALL)
    torch.testing.assert_close(net.backbone.conv1.weight, source["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(net.backbone.layer4[1].bn2.running_var, source["layer4.1.bn2.running_var"])
    rgb, _ = build_backbone("resnet18", in_channels=3, weights_path=path)
    torch.testing.assert_close(rgb.conv1.weight, source["conv1.weight"])


def test_weights_path_translates_torchvision_densenet(tmp_path):
    torch.manual_seed(6)
    source = densenet121(weights=None).state_dict()
    path = tmp_path / "densenet121.pt"
    torch.save(source, path)
    backbone, _ = build_backbone("densenet121", in_channels=1, weights_path=path)
    target = backbone.state_dict()
    torch.testing.assert_close(target["features.conv0.weight"], source["features.conv0.weight"].sum(1, keepdim=True))
    key = "features.denseblock4.denselayer16.layers.conv2.weight"
    torch.testing.assert_close(target[key], source["features.denseblock4.denselayer16.conv2.weight"])


def test_vit_translates_timm_names_and_rejects_other_sizes():
    translate = BACKBONES["vit_b_16"][3]
    backbone, _ = build_backbone("vit_b_16", in_channels=1)
    with pytest.raises(ValueError, match="224"):
        backbone(torch.rand(1, 1, 64, 64))
    target = backbone.state_dict()
    timm_keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.bias"] + [
        f"blocks.11.{name}"
        for name in ["norm1.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.bias", "norm2.bias",
                     "mlp.fc1.weight", "mlp.fc2.bias"]
    ]
    translated = [translate(k) for k in timm_keys]
    assert all(k in target for k in translated), translated
    assert len(set(translated)) == len(translated)


def test_partial_weights_warn_and_report(tmp_path):
    backbone, _ = build_backbone("tiny", in_channels=1)
    path = tmp_path / "stem_only.pt"
    stem = torch.randn(8, 1, 3, 3)
    torch.save({"model": {"encoder.0.conv.weight": stem, "decoder.weight": torch.zeros(1)}}, path)
    with pytest.warns(UserWarning, match="keep their initialisation"):
        missing, unexpected = load_backbone_weights(backbone, path, stem_key="0.conv.weight")
    assert torch.equal(backbone[0].conv.weight, stem)
    assert unexpected == ["decoder.weight"] and "0.conv.bias" in missing
    assert not any(k.endswith("num_batches_tracked") for k in missing)


def test_bad_weights_raise_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"head.weight": torch.zeros(2, 2)}, unrelated)
    wrong_shape = tmp_path / "wrong_shape.pt"
    torch.save({"2.conv.weight": torch.zeros(5, 16, 3, 3)}, wrong_shape)
    for path, pattern in [
        (garbage, "garbage.pt"),
        (unrelated, "unrelated.pt.*missing keys.*unexpected keys.*head.weight"),
        (wrong_shape, "wrong_shape.pt"),
        (tmp_path / "absent.pt", "absent.pt"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            csr_tiny(weights_path=path, **SMALL)


def test_torchscript_matches_eager():
    net, image = _net(), _image()
    roi = torch.zeros(2, 1, 64, 64)
    roi[:, :, 16:40, 8:30] = 1.0
    net.set_concept_intervention(off=[1])
    scripted = torch.jit.script(net)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), net(image))
        torch.testing.assert_close(scripted(image, roi), net(image, roi))
        eager, script_out = net.explain(image, roi), scripted.explain(image, roi)
    assert eager.keys() == script_out.keys()
    for key in eager:
        torch.testing.assert_close(script_out[key], eager[key])


@pytest.mark.parametrize("kwargs, message", ILL_CASES)
def test_ill_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        csr_tiny(**{**SMALL, **kwargs})


def test_ill_image():
    net = _net()
    for shape in [(2, 3, 64, 64), (1, 64, 64)]:
        with pytest.raises(ValueError, match="image"):
            net(torch.rand(shape))


def test_concept_dropout_switches_whole_concepts_off_in_training_only():
    net = _net(concept_dropout=0.5, training_stage=3)  # stage 3: all but the task head frozen, in eval mode
    image = torch.rand(64, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clean = net.eval().explain(image)["similarity_scores"]
        torch.manual_seed(0)
        dropped = net.train().explain(image)["similarity_scores"]
    m = net.prototypes_per_concept
    per_concept_zero = (dropped == 0).view(64, 3, m)
    assert torch.equal(per_concept_zero.all(-1), per_concept_zero.any(-1))  # a concept's prototypes go together
    kept = ~per_concept_zero.all(-1)
    torch.testing.assert_close(dropped.view(64, 3, m)[kept], clean.view(64, 3, m)[kept])  # not rescaled
    assert 0.35 < per_concept_zero.all(-1).float().mean() < 0.65
    with torch.no_grad():
        torch.testing.assert_close(net.eval().explain(image)["similarity_scores"], clean)  # eval: no dropout
    with pytest.raises(ValueError, match="concept_dropout should be in"):
        _net(concept_dropout=1.0)


@pytest.mark.parametrize("dropout, worst", [(0.0, 0.75), (0.4, 0.95)])
def test_concept_dropout_keeps_predictions_when_a_doctor_switches_a_redundant_concept_off(dropout, worst):
    """Two concepts carry the same evidence for class 0 (both present in its positives). A head trained without
    concept dropout splits its weight between them, so switching either off flips positives to negative; with
    dropout it learns that either suffices. Measured accuracy with concept 0 or 1 off: 0.70 and 0.71 without, 1.00
    with (1.00 for both with every concept on)."""
    net = _net(concept_dropout=dropout, training_stage=3)
    g = torch.Generator().manual_seed(0)
    m, n = net.prototypes_per_concept, 512
    label = torch.rand(n, generator=g) < 0.5
    evidence = torch.where(label[:, None], 0.9, 0.1) + 0.05 * torch.randn(n, 2, generator=g)
    other = torch.rand(n, 1, generator=g)  # concept 2: noise
    scores = torch.cat([evidence, other], 1).repeat_interleave(m, 1)
    head = nn.Linear(3 * m, 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    torch.manual_seed(0)
    for _ in range(300):
        optimizer.zero_grad()
        inputs = net._drop_concepts(scores) if dropout else scores
        F.binary_cross_entropy_with_logits(head(inputs)[:, 0], label.float()).backward()
        optimizer.step()
    accuracies = []
    with torch.no_grad():
        for k in (0, 1):
            off = scores.clone()
            off[:, k * m:(k + 1) * m] = 0.0  # what set_concept_intervention(off=[k]) does to the scores
            accuracies.append(((head(off)[:, 0] > 0) == label).float().mean().item())
    assert (min(accuracies) > worst) == bool(dropout), accuracies


def test_concept_vectors_pool_after_or_before_the_projector():
    after, before = _net(), _net(concept_pooling="before_projector")
    before.load_state_dict(after.state_dict())
    image = _image()
    with torch.no_grad():
        out = after.explain(image)
        torch.testing.assert_close(after.concept_vectors(out),
                                   after.local_concept_vectors(out["cams"], out["projected_features"]))
        pooled = before.concept_vectors(out)
        weights = torch.softmax(out["cams"].flatten(2), dim=-1)  # attention_temperature 1
        by_hand = torch.stack([
            torch.stack([before.projector((weights[b, k] * out["features"][b].flatten(1)).sum(-1)[None, :, None, None])
                         .flatten() for k in range(3)]) for b in range(2)])
    torch.testing.assert_close(pooled, by_hand)
    # the ReLU between the projector's two convolutions makes the orders differ
    assert not torch.allclose(pooled, after.concept_vectors(out))
    with pytest.raises(ValueError, match="Unsupported option 'middle'"):
        _net(concept_pooling="middle")
