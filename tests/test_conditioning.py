import pytest
import torch
from dejaguard.core.conditioning import pack_pooled, unpack_pooled
from dejaguard.core.errors import DejaGuardError


def test_pack_roundtrip_and_gradient_reaches_both_parts():
    hidden = torch.randn(2, 77, 16, requires_grad=True)
    pooled = torch.randn(2, 12, requires_grad=True)
    packed = pack_pooled(hidden, pooled)
    assert packed.shape == (2, 78, 16)
    assert torch.equal(packed[:, -1, 12:], torch.zeros(2, 4))
    h, p = unpack_pooled(packed, 12)
    assert torch.equal(h, hidden) and torch.equal(p, pooled)
    (h.sum() + 2 * p.sum()).backward()
    assert torch.equal(hidden.grad, torch.ones_like(hidden))
    assert torch.equal(pooled.grad, 2 * torch.ones_like(pooled))


def test_pack_refuses_mismatched_shapes():
    with pytest.raises(DejaGuardError, match="exceeds"):
        pack_pooled(torch.zeros(1, 77, 8), torch.zeros(1, 9))
    with pytest.raises(DejaGuardError, match="cannot pack"):
        pack_pooled(torch.zeros(1, 77, 8), torch.zeros(2, 8))
    with pytest.raises(DejaGuardError, match="does not carry"):
        unpack_pooled(torch.zeros(1, 77, 8), 9)
