"""Feature extractors and the Interaction Module (paper §3.2, eqs. 1-7): shapes, gradients, golden outputs
and agreement with direct transcriptions of the equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sum_models.extractors import (
    CrossLayer,
    DCNExtractor,
    DotCompressionAttention,
    MixerBlock,
    MLPMixerExtractor,
    build_extractor,
)
from sum_models.interaction import InteractionModule, InteractionPyramid
from sum_models.layers import LinearCompression

B, N, N_DENSE, D, T = 4, 5, 2, 8, 3

CONFIGS = {
    "mlp": {"type": "mlp", "tokens": T, "hidden": [16]},
    "dot_compression": {"type": "dot_compression", "tokens": T, "compressed_tokens": 2, "hidden": [16]},
    "dcn": {"type": "dcn", "tokens": T, "num_layers": 2, "rank": 0},
    "dcn_low_rank": {"type": "dcn", "tokens": T, "num_layers": 2, "rank": 4},
    "mixer": {"type": "mixer", "tokens": T, "token_hidden": 6, "channel_hidden": 12},
}


def _inputs(seed: int = 1, n: int = N, n_dense: int = N_DENSE, d: int = D, b: int = B):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=gen), torch.randn(b, n_dense, d, generator=gen)


def _build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_extractor(CONFIGS[name], N, N_DENSE, D)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_extractor_output_shape_and_docstring(name):
    module = _build(name)
    x, x_dense = _inputs()
    out = module(x, x_dense)
    assert out.shape == (B, T, D) and out.dtype == torch.float32
    assert "[B, " in type(module).forward.__doc__  # every forward states its shapes


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_reach_every_extractor_parameter(name):
    module = _build(name)
    x, x_dense = _inputs()
    weights = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))
    (module(x, x_dense) * weights).sum().backward()
    for pname, param in module.named_parameters():
        assert param.grad is not None, pname
        assert float(param.grad.abs().sum()) > 0, pname


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_extractor_golden_output(name, golden):
    module = _build(name)
    x, x_dense = _inputs()
    with torch.no_grad():
        golden(name, module(x, x_dense))


def test_dot_compression_without_dense_tokens():
    torch.manual_seed(0)
    module = DotCompressionAttention(N, 0, D, tokens=T, compressed_tokens=2, hidden=[8])
    x, _ = _inputs()
    assert module(x, torch.zeros(B, 0, D)).shape == (B, T, D)


# ------------------------------------------------------------------------------------------------
# Direct transcriptions of the equations (float64, per example, the N x N matrix written out)
# ------------------------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _mlp_np(mlp, v: np.ndarray) -> np.ndarray:
    layers = [m for m in mlp.net if isinstance(m, torch.nn.Linear)]
    for i, lin in enumerate(layers):
        v = _np(lin.weight) @ v + _np(lin.bias)
        if i < len(layers) - 1:
            v = np.maximum(v, 0.0)
    return v


def test_dot_compression_matches_eqs_2_to_4():
    torch.manual_seed(0)
    m = DotCompressionAttention(N, N_DENSE, D, tokens=T, compressed_tokens=2, hidden=[16])
    x, x_dense = _inputs()
    with torch.no_grad():
        got = _np(m(x, x_dense))
    for b in range(B):
        X, Xd = _np(x[b]), _np(x_dense[b])  # [N, D], [N_dense, D]
        lc_y = (_np(m.lc_y.weight) @ X).ravel()  # LC(X): weighted sums of the tokens
        fc_y = _np(m.fc_y.weight) @ Xd.ravel()  # LC(X_dense) = FC(X_dense)
        Y = _mlp_np(m.mlp_y, np.concatenate([fc_y, lc_y])).reshape(N, T)  # eq. 2
        lc_z = (_np(m.lc_z.weight) @ X).ravel()
        fc_z = _np(m.fc_z.weight) @ Xd.ravel()
        Z = _mlp_np(m.mlp_z, np.concatenate([fc_z, lc_z])).reshape(D, T)  # eq. 3
        gram = X @ X.T  # the N x N pairwise dot-product matrix
        out = gram @ Y + X @ Z  # eq. 4: X (X^T Y + Z)
        tokens = out.T @ _np(m.project.weight).T + _np(m.project.bias)  # [T, D]
        np.testing.assert_allclose(got[b], tokens, rtol=1e-4, atol=1e-5)


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_dot_compression_never_materialises_the_n_by_n_matrix():
    n = 37  # distinct from every other size, so an [.., 37, 37] tensor can only be X X^T
    torch.manual_seed(0)
    m = DotCompressionAttention(n, N_DENSE, D, tokens=T, compressed_tokens=2, hidden=[16])
    x, x_dense = _inputs(n=n)
    with _ShapeRecorder() as rec:
        out = m(x, x_dense)
        out.sum().backward()
    assert rec.shapes and not any(len(s) >= 2 and s[-1] == n and s[-2] == n for s in rec.shapes)
    assert not any(np.prod(s) >= B * n * n and n in s and s.count(n) >= 2 for s in rec.shapes)


def test_cross_layer_matches_eq_5_full_and_low_rank():
    x0 = torch.randn(3, 10, dtype=torch.float64)
    xl = torch.randn(3, 10, dtype=torch.float64)
    for rank in (0, 4):
        torch.manual_seed(rank)
        layer = CrossLayer(10, rank).double()
        if rank:
            W = layer.up.weight @ layer.down.weight  # U V^T
        else:
            W = layer.up.weight
        b = layer.up.bias
        with torch.no_grad():
            got = layer(x0, xl)
            for i in range(3):  # eq. 5 for one example: x_{l+1} = x_0 * (W x_l + b) + x_l
                want = x0[i] * (W @ xl[i] + b) + xl[i]
                torch.testing.assert_close(got[i], want)


def test_dcn_extractor_stacks_cross_layers_then_compresses():
    torch.manual_seed(0)
    m = DCNExtractor(N, N_DENSE, D, tokens=T, num_layers=3, rank=0)
    x, x_dense = _inputs()
    with torch.no_grad():
        x0 = x.flatten(1)
        h = x0
        for layer in m.layers:
            h = x0 * (h @ layer.up.weight.T + layer.up.bias) + h  # eq. 5, L times
        want = torch.einsum("mn,bnd->bmd", m.compress.weight, h.view(B, N, D))
        torch.testing.assert_close(m(x, x_dense), want, rtol=1e-5, atol=1e-6)


def _layer_norm_np(v: np.ndarray, ln: torch.nn.LayerNorm) -> np.ndarray:
    mu, var = v.mean(), v.var()
    return (v - mu) / np.sqrt(var + ln.eps) * _np(ln.weight) + _np(ln.bias)


def test_mixer_block_matches_eqs_6_and_7():
    torch.manual_seed(0)
    block = MixerBlock(N, D, token_hidden=6, channel_hidden=12)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for ln in (block.token_norm, block.channel_norm):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.2, 0.2)
    x, _ = _inputs()
    with torch.no_grad():
        got = _np(block(x))
    W1, b1 = _np(block.token_fc1.weight), _np(block.token_fc1.bias)  # [H_t, N]
    W2, b2 = _np(block.token_fc2.weight), _np(block.token_fc2.bias)  # [N, H_t]
    W3, b3 = _np(block.channel_fc1.weight), _np(block.channel_fc1.bias)  # [H_c, D]
    W4, b4 = _np(block.channel_fc2.weight), _np(block.channel_fc2.bias)  # [D, H_c]
    for b in range(B):
        X = _np(x[b]).T  # the paper's layout: [D, N], one column per token
        LN = np.stack([_layer_norm_np(X[:, n], block.token_norm) for n in range(N)], axis=1)  # per token
        # eq. 6, token mixing: the same MLP over the token axis, one channel (row) at a time
        Y = X + np.stack([W2 @ np.maximum(W1 @ LN[c] + b1, 0) + b2 for c in range(D)], axis=0)
        LNY = np.stack([_layer_norm_np(Y[:, n], block.channel_norm) for n in range(N)], axis=1)
        # eq. 7, channel mixing: the same MLP over the channel axis, one token (column) at a time
        Z = Y + np.stack([W4 @ np.maximum(W3 @ LNY[:, n] + b3, 0) + b4 for n in range(N)], axis=1)
        np.testing.assert_allclose(got[b], Z.T, rtol=1e-4, atol=1e-5)


def test_mixer_extractor_is_block_then_lc():
    torch.manual_seed(0)
    m = MLPMixerExtractor(N, N_DENSE, D, tokens=T, token_hidden=6, channel_hidden=12)
    x, x_dense = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(m(x, x_dense), m.compress(m.block(x)))


def test_linear_compression_is_weighted_sums_of_tokens():
    torch.manual_seed(0)
    lc = LinearCompression(N, 3)
    x, _ = _inputs()
    with torch.no_grad():
        want = torch.stack([sum(lc.weight[m, n] * x[:, n] for n in range(N)) for m in range(3)], dim=1)
        torch.testing.assert_close(lc(x), want)


# ------------------------------------------------------------------------------------------------
# Interaction Module (eq. 1) and pyramid
# ------------------------------------------------------------------------------------------------
def test_interaction_module_is_eq_1():
    torch.manual_seed(0)
    extractors = [CONFIGS["mlp"], CONFIGS["dot_compression"], CONFIGS["mixer"]]
    module = InteractionModule(N, N_DENSE, D, extractors, residual_tokens=2)
    x, x_dense = _inputs()
    with torch.no_grad():
        out = module(x, x_dense)
        want = torch.cat([e(x, x_dense) for e in module.extractors] + [x_dense, module.residual(x)], dim=1)
    assert out.shape == (B, 3 * T + N_DENSE + 2, D) == (B, module.num_out_tokens, D)
    torch.testing.assert_close(out, want)
    # The raw dense tokens pass through unchanged (X_dense of eq. 1).
    torch.testing.assert_close(out[:, 3 * T : 3 * T + N_DENSE], x_dense)


def test_pyramid_shrinks_tokens_to_k_embeddings(golden):
    torch.manual_seed(0)
    layers = [
        {"residual_tokens": 4, "extractors": [CONFIGS["mlp"], CONFIGS["dot_compression"], CONFIGS["dcn_low_rank"]]},
        {"residual_tokens": 2, "extractors": [CONFIGS["mixer"]]},
    ]
    n0 = 20
    pyramid = InteractionPyramid(n0, N_DENSE, D, layers, num_embeddings=2)
    assert pyramid.token_counts == [n0, 3 * T + N_DENSE + 4, T + N_DENSE + 2]
    x0, x_dense = _inputs(n=n0)
    out = pyramid(x0, x_dense)
    assert out.shape == (B, 2, D)
    out.sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in pyramid.parameters())
    golden("pyramid", out)
