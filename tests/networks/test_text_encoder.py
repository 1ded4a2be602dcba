from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from common.networks.text_encoder import TextEncoder, default_text_model_dir

TEXTS = ["A 12 mm nodule in the right lung.", "A 30 mm cyst in the liver.", "No acute abnormality."]

# kwargs, the error message's start
ILL_CASES = [
    [{"out_dim": 0}, "out_dim should be"],
    [{"freeze": "some"}, "'some' is not a valid value"],
    [{"freeze": "last_n", "num_trainable_layers": 7}, "num_trainable_layers should be at most 6"],  # MiniLM-L6
    [{"num_trainable_layers": 0}, "num_trainable_layers should be"],
    [{"max_length": 0}, "max_length should be"],
]


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    return TextEncoder(out_dim=16).eval()


def test_loads_offline_and_embeds(encoder):
    assert encoder.model_dir == default_text_model_dir()
    assert "tokenizer" not in dict(encoder.named_children())
    assert not any(k.startswith("tokenizer") for k in encoder.state_dict())
    with torch.no_grad():
        emb = encoder.embed(TEXTS)
    assert emb.shape == (3, 16) and torch.isfinite(emb).all()
    # padding does not change an embedding: the mean is over the attention mask only
    with torch.no_grad():
        alone = encoder.embed(TEXTS[2:])
    torch.testing.assert_close(alone[0], emb[2], atol=1e-5, rtol=1e-5)


def test_mean_pooling_matches_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(default_text_model_dir()), device="cpu", local_files_only=True)
    expected = torch.as_tensor(st.encode(TEXTS, normalize_embeddings=True))
    batch = encoder.tokenize(TEXTS)
    with torch.no_grad():
        hidden = encoder.backbone(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(F.normalize(pooled, dim=-1), expected, atol=1e-4, rtol=1e-4)


def test_tokenize_max_length(encoder):
    batch = encoder.tokenize(["word " * 100], max_length=12)
    assert batch["input_ids"].shape == (1, 12) and batch["attention_mask"].shape == (1, 12)


@pytest.mark.parametrize("texts", [[""], ["fine", "   "], [], [None]])
def test_empty_text_raises(encoder, texts):
    with pytest.raises(ValueError, match="texts should"):
        encoder.tokenize(texts)


def test_forward_rejects_rows_without_text(encoder):
    ids = torch.tensor([[101, 102, 0], [101, 1037, 102]])  # [CLS] [SEP] is an empty report
    with pytest.raises(ValueError, match="empty rows \\[0\\]"):
        encoder(ids, (ids > 0).long())


FREEZE_CASES = [("all", 1, []), ("none", 1, list(range(6))), ("last_n", 2, [4, 5])]


@pytest.mark.parametrize("freeze, n, trainable_layers", FREEZE_CASES)
def test_freezing(freeze, n, trainable_layers):
    enc = TextEncoder(out_dim=8, freeze=freeze, num_trainable_layers=n)
    layers = enc.backbone.encoder.layer
    for i, layer in enumerate(layers):
        assert all(p.requires_grad == (i in trainable_layers) for p in layer.parameters()), i
    assert all(p.requires_grad == (freeze == "none") for p in enc.backbone.embeddings.parameters())
    assert all(not p.requires_grad for p in enc.backbone.pooler.parameters())
    assert enc.projection.weight.requires_grad
    enc.train()
    assert enc.projection.training
    assert all(layers[i].training == (i in trainable_layers) for i in range(6))
    assert enc.backbone.embeddings.training == (freeze == "none")
    # gradients reach exactly the trainable parameters
    enc.embed(TEXTS[:2]).sum().backward()
    for name, p in enc.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


@pytest.mark.parametrize("kwargs, message", ILL_CASES)
def test_ill_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextEncoder(**kwargs)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ValueError, match="model_dir should be a local model folder"):
        TextEncoder(model_dir=tmp_path)
