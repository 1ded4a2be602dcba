from __future__ import annotations

import pytest
import torch

from common.networks import ClassMemoryBank

# kwargs, the error message's start
ILL_CASES = [
    [{"momentum": 1.0}, "momentum should be"],
    [{"momentum": -0.1}, "momentum should be"],
    [{"momentum": 1.5}, "momentum should be"],
    [{"capacity": 0}, "capacity should be"],
    [{"capacity": -3}, "capacity should be"],
]


def _bank(**kwargs) -> ClassMemoryBank:
    return ClassMemoryBank(**{"num_tokens": 3, "embed_dim": 4, "capacity": 4, "momentum": 0.9, **kwargs})


@pytest.mark.parametrize("kwargs, message", ILL_CASES)
def test_ill_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _bank(**kwargs)


def test_starts_empty():
    bank = _bank()
    assert bank.class_names == [] and bank.known_classes == []
    assert torch.equal(bank.embeddings, torch.zeros(4, 3, 4))
    assert torch.equal(bank.counts, torch.zeros(4, dtype=torch.long))


def test_first_update_copies_then_ema():
    torch.manual_seed(0)
    bank = _bank()
    e1, e2, e3 = torch.randn(3, 2, 3, 4).unbind(0)
    bank.update(["liver", "spleen"], e1)
    assert torch.equal(bank.retrieve(["liver", "spleen"]), e1)
    bank.update(["liver", "spleen"], e2)
    expected = 0.9 * e1 + 0.1 * e2
    torch.testing.assert_close(bank.retrieve(["liver", "spleen"]), expected)
    bank.update(["spleen"], e3[:1])
    torch.testing.assert_close(bank.retrieve(["spleen"])[0], 0.9 * expected[1] + 0.1 * e3[0])
    torch.testing.assert_close(bank.retrieve(["liver"])[0], expected[0])  # untouched by the third update
    assert bank.counts[:2].tolist() == [2, 3]


def test_momentum_zero_keeps_the_latest():
    bank = _bank(momentum=0.0)
    bank.update(["a"], torch.ones(1, 3, 4))
    bank.update(["a"], torch.full((1, 3, 4), 5.0))
    assert torch.equal(bank.retrieve(["a"]), torch.full((1, 3, 4), 5.0))


def test_duplicate_names_in_one_update_use_their_mean():
    torch.manual_seed(1)
    bank = _bank()
    first = torch.randn(1, 3, 4)
    bank.update(["a"], first)
    new = torch.randn(3, 3, 4)
    bank.update(["a", "b", "a"], new)
    torch.testing.assert_close(bank.retrieve(["a"])[0], 0.9 * first[0] + 0.1 * (new[0] + new[2]) / 2)
    torch.testing.assert_close(bank.retrieve(["b"])[0], new[1])  # a new class copies
    assert bank.counts[:2].tolist() == [2, 1]  # one update per name, however often it is given


def test_update_does_not_track_gradients():
    bank = _bank()
    e = torch.randn(1, 3, 4, requires_grad=True)
    bank.update(["a"], e)
    assert not bank.embeddings.requires_grad
    assert not bank.retrieve(["a"]).requires_grad


def test_retrieve_follows_the_requested_order():
    bank = _bank()
    e = torch.arange(3, dtype=torch.float32).view(3, 1, 1).expand(3, 3, 4)
    bank.update(["a", "b", "c"], e)
    out = bank.retrieve(["c", "a", "b", "a"])
    assert out.shape == (4, 3, 4)
    assert out[:, 0, 0].tolist() == [2.0, 0.0, 1.0, 0.0]
    out.zero_()  # a copy: the bank is unchanged
    assert bank.retrieve(["c"])[0, 0, 0] == 2.0


def test_unknown_class_raises_key_error_naming_it():
    bank = _bank()
    bank.update(["a"], torch.zeros(1, 3, 4))
    with pytest.raises(KeyError, match="pancreas"):
        bank.retrieve(["a", "pancreas"])


def test_registered_but_never_updated_is_not_known():
    bank = _bank()
    ids = bank.register(["x", "y", "x"])
    assert ids.tolist() == [0, 1, 0]
    assert bank.class_names == ["x", "y"] and bank.known_classes == []
    with pytest.raises(KeyError, match="x"):
        bank.retrieve(["x"])


def test_capacity_overflow():
    bank = _bank(capacity=2)
    bank.update(["a", "b"], torch.zeros(2, 3, 4))
    bank.update(["a", "b"], torch.zeros(2, 3, 4))  # known names take no new slot
    with pytest.raises(ValueError, match="full"):
        bank.update(["c"], torch.zeros(1, 3, 4))
    assert bank.class_names == ["a", "b"]


@pytest.mark.parametrize("names, shape", [[["a"], (2, 3, 4)], [["a", "b"], (2, 3, 5)], [["a"], (1, 4, 4)]])
def test_update_with_wrong_shape(names, shape):
    bank = _bank()
    with pytest.raises(ValueError, match="embeddings should have shape"):
        bank.update(names, torch.zeros(*shape))
    assert bank.class_names == []


def test_state_dict_round_trip_keeps_class_names():
    torch.manual_seed(2)
    bank = _bank()
    e = torch.randn(2, 3, 4)
    bank.update(["liver", "kidney"], e)
    bank.register(["spleen"])
    fresh = _bank(momentum=0.5)
    fresh.load_state_dict(bank.state_dict())
    assert fresh.class_names == ["liver", "kidney", "spleen"]
    assert fresh.known_classes == ["liver", "kidney"]
    assert fresh.momentum == 0.9
    assert torch.equal(fresh.retrieve(["kidney", "liver"]), e[[1, 0]])
    assert torch.equal(fresh.counts, bank.counts)


def test_state_dict_survives_torch_save(tmp_path):
    bank = _bank()
    bank.update(["a"], torch.ones(1, 3, 4))
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    fresh = _bank()
    fresh.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    assert fresh.known_classes == ["a"]
    assert torch.equal(fresh.retrieve(["a"]), torch.ones(1, 3, 4))
