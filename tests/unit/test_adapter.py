"""RepAdapter module: initialisation, grouped up-projection, affine form, dropout semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repadapter import RepAdapter, dense_up


def test_dense_up_matches_grouped_conv1d():
    torch.manual_seed(0)
    d, r, g = 12, 8, 2
    conv = nn.Conv1d(r, d, 1, groups=g, bias=False)
    h = torch.randn(5, r)
    expected = conv(h[:, :, None])[:, :, 0]
    dense = dense_up(conv.weight[:, :, 0], g)
    assert dense.shape == (d, r)
    torch.testing.assert_close(h @ dense.T, expected, rtol=0, atol=1e-6)
    assert (dense[: d // 2, r // 2 :] == 0).all()
    assert (dense[d // 2 :, : r // 2] == 0).all()


def test_new_adapter_is_identity_and_init_like_paper():
    a = RepAdapter(16, hidden=8, groups=2)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(a.eval()(x), x, rtol=0, atol=0)
    assert a.weight_a.abs().sum() > 0  # xavier-uniform, not zero
    bound = (6 / (16 + 8)) ** 0.5
    assert a.weight_a.abs().max() <= bound
    assert a.weight_b.abs().sum() == 0
    assert a.bias_a.abs().sum() == 0
    assert a.bias_b.abs().sum() == 0


def test_forward_equals_affine_form():
    torch.manual_seed(1)
    a = RepAdapter(16, hidden=8, groups=4, scale=0.7).eval()
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    x = torch.randn(3, 16)
    w = a.weights()
    m = torch.eye(16) + w.scale * w.dense_b() @ w.weight_a
    c = w.scale * (w.dense_b() @ w.bias_a + w.bias_b)
    torch.testing.assert_close(a(x), x @ m.T + c, rtol=1e-5, atol=1e-5)


def test_channel_layout_equals_token_layout():
    torch.manual_seed(2)
    tok = RepAdapter(8, hidden=4, groups=2, layout="token").eval()
    with torch.no_grad():
        for p in tok.parameters():
            p.normal_()
    chan = RepAdapter.from_weights(tok.weights(), layout="channel")
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(chan(x), tok(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(3)
    a = RepAdapter(32, hidden=8, dropout=0.5)
    with torch.no_grad():
        a.weight_b.normal_()
    x = torch.randn(4, 32)
    a.eval()
    torch.testing.assert_close(a(x), a(x), rtol=0, atol=0)
    a.train()
    assert not torch.equal(a(x), a(x))


def test_bad_groups_rejected():
    with pytest.raises(ValueError, match="divisible"):
        RepAdapter(10, hidden=8, groups=3)
