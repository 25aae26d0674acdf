"""Attention and output logit statistics against logits materialised by hand in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_diag.metrics.logits as logits_module
from lightning_diag.metrics.logits import (
    AttentionLogitRecorder,
    attention_logit_stats,
    compiled_regions,
    mha_attention_stats,
    output_logit_stats,
    sdpa_attention_stats,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _reference(q, k, allowed=None, bias=None, scale=None):
    """float64 max logit and mean entropy per head; q (N, H, L, E), k (N, H, S, E)."""
    q, k = q.double(), k.double()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    n, h, length, _ = q.shape
    keys = k.shape[-2]
    maxima, entropies = [], []
    for head in range(h):
        best, total, rows = -math.inf, 0.0, 0
        for b in range(n):
            for i in range(length):
                row = []
                for j in range(keys):
                    ok = True if allowed is None else bool(allowed[b, head, i, j])
                    z = float(q[b, head, i] @ k[b, head, j]) * scale
                    if bias is not None:
                        z += float(bias[b, head, i, j])
                        ok = ok and not math.isinf(float(bias[b, head, i, j]))
                    if ok:
                        row.append(z)
                if row:
                    best = max(best, *row)
                    p = torch.softmax(torch.tensor(row, dtype=torch.float64), 0)
                    total += float(-(p * p.clamp_min(1e-300).log()).sum())
                    rows += 1
        maxima.append(best)
        entropies.append(total / rows if rows else math.nan)
    return torch.tensor(maxima, dtype=torch.float64), torch.tensor(entropies, dtype=torch.float64)


def _check(stats, ref_max, ref_entropy, rtol=1e-5):
    torch.testing.assert_close(stats.max_logit_per_head.double(), ref_max, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(stats.max_logit.double(), ref_max.max(), rtol=rtol, atol=1e-5)
    torch.testing.assert_close(stats.entropy_per_head.double(), ref_entropy, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(stats.entropy_min.double(), ref_entropy.min(), rtol=rtol, atol=1e-5)


def _qk(n=2, h=3, length=5, keys=5, e=4, seed=0):
    g = _gen(seed)
    return 2 * torch.randn(n, h, length, e, generator=g), 2 * torch.randn(n, h, keys, e, generator=g)


def test_attention_max_without_mask_and_with_custom_scale():
    q, k = _qk()
    _check(attention_logit_stats(q, k), *_reference(q, k))
    _check(attention_logit_stats(q, k, scale=0.3), *_reference(q, k, scale=0.3))
    assert attention_logit_stats(q, k).max_logit.dtype == torch.float32


def test_attention_max_is_causal_never_counts_future_keys():
    q, k = _qk(length=6, keys=6)
    k[:, :, -1] = 50 * q[:, :, 0]  # a huge logit for query 0 at the last key: masked by causality
    causal = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 3, 6, 6)
    stats = attention_logit_stats(q, k, is_causal=True)
    _check(stats, *_reference(q, k, allowed=causal))
    assert stats.max_logit < attention_logit_stats(q, k).max_logit


def test_attention_max_boolean_mask_false_is_masked_and_fully_masked_rows_are_skipped():
    q, k = _qk(length=4, keys=6)
    mask = torch.rand(2, 1, 4, 6, generator=_gen(1)) > 0.4  # broadcast over heads
    mask[0, 0, 2] = False  # a fully masked row: no entropy, no maximum
    planted = ~mask[1, 0, 1]
    k[1, :, planted.nonzero()[0]] = 100 * q[1, :, 1].unsqueeze(1)  # huge but masked
    stats = attention_logit_stats(q, k, attn_mask=mask)
    _check(stats, *_reference(q, k, allowed=mask.expand(2, 3, 4, 6)))


def test_attention_max_float_mask_adds_biases_and_minus_inf_masks():
    q, k = _qk(length=4, keys=5)
    bias = torch.randn(4, 5, generator=_gen(2))  # (L, S), broadcast
    bias[0, 3] = bias[2, 1] = -math.inf
    stats = attention_logit_stats(q, k, attn_mask=bias)
    _check(stats, *_reference(q, k, bias=bias.expand(2, 3, 4, 5)))


def test_attention_max_with_grouped_query_heads():
    g = _gen(3)
    q, k = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    stats = attention_logit_stats(q, k, enable_gqa=True)
    _check(stats, *_reference(q, k.repeat_interleave(2, dim=1)))
    # SDPA agrees on the grouping: its output from our expanded keys is the same.
    v = torch.randn(2, 2, 5, 8, generator=g)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                               F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)))


def test_attention_max_three_dimensional_input_and_mask():
    g = _gen(4)
    q, k = torch.randn(3, 5, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    mask = torch.rand(3, 5, 6, generator=g) > 0.3
    stats = attention_logit_stats(q, k, attn_mask=mask)
    assert stats.max_logit_per_head.shape == (1,)
    _check(stats, *_reference(q.unsqueeze(1), k.unsqueeze(1), allowed=mask.unsqueeze(1)))


def test_attention_max_over_sampled_queries_is_exact_on_those_rows():
    q, k = _qk(length=9, keys=9)
    rows = torch.tensor([0, 2, 4, 6, 8])  # 5 evenly spaced of 9, first and last included
    stats = attention_logit_stats(q, k, is_causal=True, max_queries=5)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()[rows].expand(2, 3, 5, 9)
    _check(stats, *_reference(q[:, :, rows], k, allowed=causal))
    full = attention_logit_stats(q, k, is_causal=True)
    assert stats.max_logit <= full.max_logit
    all_rows = attention_logit_stats(q, k, max_queries=9)
    torch.testing.assert_close(all_rows.max_logit, attention_logit_stats(q, k).max_logit)


def test_attention_max_all_masked_is_nan_and_nan_input_is_nan():
    q, k = _qk()
    stats = attention_logit_stats(q, k, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    assert torch.isnan(stats.max_logit) and torch.isnan(stats.entropy_min)
    q[0, 1, 2, 0] = math.nan
    assert torch.isnan(attention_logit_stats(q, k).max_logit)
    # ...unless the NaN sits only where the mask hides it.
    hide = torch.ones(2, 3, 5, 5, dtype=torch.bool)
    hide[0, 1, 2] = False
    assert torch.isfinite(attention_logit_stats(q, k, attn_mask=hide).max_logit)


def test_attention_stats_validation():
    with pytest.raises(ValueError, match="query"):
        attention_logit_stats(torch.ones(2, 3, 4), torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match="max_queries"):
        attention_logit_stats(torch.ones(2, 3, 4), torch.ones(2, 3, 4), max_queries=0)


def test_sdpa_arguments_positional_and_keyword():
    q, k = _qk()
    v = torch.randn_like(k)
    mask = torch.rand(5, 5, generator=_gen(5)) > 0.3
    a = sdpa_attention_stats(q, k, v, mask, 0.0, False, 0.5)
    b = sdpa_attention_stats(query=q, key=k, value=v, attn_mask=mask, scale=0.5)
    _check(a, *_reference(q, k, allowed=mask.expand(2, 3, 5, 5), scale=0.5))
    torch.testing.assert_close(a.max_logit, b.max_logit)


# -- nn.MultiheadAttention ------------------------------------------------------------------------


@torch.no_grad()
def _mha_reference(mha, query, key, key_padding_mask=None, attn_mask=None):
    """Logits by hand from the in-projection (float64), module mask convention (True = ignore)."""
    if not mha.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    if mha._qkv_same_embed_dim:
        w_q, w_k = mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e]
    else:
        w_q, w_k = mha.q_proj_weight, mha.k_proj_weight
    b = mha.in_proj_bias if mha.in_proj_bias is not None else torch.zeros(3 * e)
    q = query.double() @ w_q.double().T + b[:e].double()
    k = key.double() @ w_k.double().T + b[e:2 * e].double()
    n, length, keys = q.shape[0], q.shape[1], k.shape[1]
    q = q.view(n, length, h, d).transpose(1, 2)
    k = k.view(n, keys, h, d).transpose(1, 2)
    allowed = torch.ones(n, h, length, keys, dtype=torch.bool)
    bias = torch.zeros(n, h, length, keys, dtype=torch.float64)
    for mask, shape in ((key_padding_mask, (n, 1, 1, keys)), (attn_mask, None)):
        if mask is None:
            continue
        m = mask.view(shape) if shape else (mask.view(n, h, length, keys) if mask.ndim == 3 else mask)
        if m.dtype == torch.bool:
            allowed &= ~m
        else:
            bias = bias + m.double()
    return _reference(q, k, allowed=allowed, bias=bias)


def _mha_weights_entropy(mha, query, key, value, **kwargs):
    """Entropy per head from the module's own attention weights (an independent check)."""
    _, w = mha(query, key, value, need_weights=True, average_attn_weights=False, **kwargs)
    ent = torch.special.entr(w.double()).sum(-1)  # (N, H, L)
    return ent.mean(dim=(0, 2))


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_matches_in_projection_with_padding_and_causal_masks(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    g = _gen(6)
    x = torch.randn(3, 5, 8, generator=g)
    x_in = x if batch_first else x.transpose(0, 1)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[0, 3:] = True  # last two keys of sequence 0 are padding
    causal = nn.Transformer.generate_square_subsequent_mask(5)  # float, -inf above the diagonal
    causal_bool = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = ignore
    for kwargs in ({}, {"key_padding_mask": kpm}, {"attn_mask": causal}, {"attn_mask": causal_bool},
                   {"key_padding_mask": kpm, "attn_mask": causal_bool, "is_causal": True}):
        stats = mha_attention_stats(mha, x_in, x_in, x_in, **kwargs)
        ref_max, ref_ent = _mha_reference(mha, x_in, x_in, **{k: v for k, v in kwargs.items() if k != "is_causal"})
        _check(stats, ref_max, ref_ent)
        own = _mha_weights_entropy(mha, x_in, x_in, x_in, **kwargs)
        torch.testing.assert_close(stats.entropy_per_head.double(), own, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # the module's own
def test_mha_with_kdim_float_padding_mask_per_head_mask_and_no_bias():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(6, 3, kdim=4, vdim=5, bias=False, batch_first=True)
    g = _gen(7)
    q, k, v = torch.randn(2, 4, 6, generator=g), torch.randn(2, 7, 4, generator=g), torch.randn(2, 7, 5, generator=g)
    kpm = torch.zeros(2, 7)
    kpm[1, 5:] = -math.inf
    per_head = torch.rand(2 * 3, 4, 7, generator=g) > 0.8  # True = ignore
    per_head[:, :, 0] = False  # keep a key per row
    stats = mha_attention_stats(mha, q, k, v, key_padding_mask=kpm, attn_mask=per_head)
    _check(stats, *_mha_reference(mha, q, k, key_padding_mask=kpm, attn_mask=per_head))
    torch.testing.assert_close(stats.entropy_per_head.double(),
                               _mha_weights_entropy(mha, q, k, v, key_padding_mask=kpm, attn_mask=per_head),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bias_kv", "zero_attn"), [(True, False), (False, True), (True, True)])
def test_mha_appended_keys_count_like_the_module(bias_kv, zero_attn):
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(4, 2, add_bias_kv=bias_kv, add_zero_attn=zero_attn)
    if bias_kv:
        nn.init.normal_(mha.bias_k, std=3.0)
    x = torch.randn(5, 2, 4, generator=_gen(8))  # (L, N, E)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 2:] = True
    stats = mha_attention_stats(mha, x, x, x, key_padding_mask=kpm)
    own = _mha_weights_entropy(mha, x, x, x, key_padding_mask=kpm)
    torch.testing.assert_close(stats.entropy_per_head.double(), own, rtol=1e-5, atol=1e-5)
    # The appended keys are part of the maximum: a zero key contributes a logit of exactly 0.
    if zero_attn and not bias_kv:
        assert stats.max_logit >= 0


def test_mha_unbatched_input():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(4, 2)
    x = torch.randn(5, 4, generator=_gen(9))
    stats = mha_attention_stats(mha, x, x, x)
    _check(stats, *_mha_reference(mha, x.unsqueeze(1), x.unsqueeze(1)))


# -- the recorder ---------------------------------------------------------------------------------


class SdpaBlock(nn.Module):
    def __init__(self, e=8, h=2):
        super().__init__()
        self.h, self.qkv = h, nn.Linear(e, 3 * e)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, c // self.h).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        self.seen.append((q.detach(), k.detach()))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.7)
        return y.transpose(1, 2).reshape(b, t, c)


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([SdpaBlock(), SdpaBlock()])
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x + self.attn(x, x, x, need_weights=False)[0]


def _mode_stack_depth():
    return torch._C._len_torch_function_stack()


def test_recorder_names_layers_and_matches_sdpa_arguments():
    torch.manual_seed(4)
    model = TwoBlocks()
    x = torch.randn(2, 6, 8, generator=_gen(10))
    plain = model(x)
    with AttentionLogitRecorder(model, max_queries=None) as rec:
        recorded = model(x)
    assert torch.equal(plain, recorded)  # the real SDPA ran, unchanged
    stats = rec.stats()
    assert sorted(stats) == ["attn", "blocks.0", "blocks.1"]
    assert rec.num_calls == 3 and not rec.errors  # the SDPA inside the MHA is not counted twice
    causal = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 2, 6, 6)
    for i in range(2):
        q, k = model.blocks[i].seen[-1]
        _check(stats[f"blocks.{i}"], *_reference(q, k, allowed=causal, scale=0.7))
    _check(stats["attn"], *_mha_reference(model.attn, *[t.detach() for t in _attn_input(model, x)]))
    # Outside the block: no hook, no mode, nothing recorded.
    assert _mode_stack_depth() == 0
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    model(x)
    assert rec.num_calls == 3


def _attn_input(model, x):
    for block in model.blocks:
        x = x + block(x)
    return x, x


def test_recorder_aggregates_calls_and_resets():
    torch.manual_seed(5)
    block = SdpaBlock()
    x1, x2 = torch.randn(1, 4, 8, generator=_gen(11)), 5 * torch.randn(1, 4, 8, generator=_gen(12))
    with AttentionLogitRecorder(block) as rec:
        block(x1)
        block(x2)
    s = rec.stats()["model"]
    one = [attention_logit_stats(q, k, is_causal=True, scale=0.7) for q, k in block.seen[-2:]]
    torch.testing.assert_close(s.max_logit, torch.maximum(one[0].max_logit, one[1].max_logit))
    torch.testing.assert_close(s.entropy_min, torch.minimum(one[0].entropy_min, one[1].entropy_min))
    rec.reset()
    assert rec.stats() == {} and rec.num_calls == 0


def test_recorder_cleans_up_when_the_body_raises():
    model = TwoBlocks()
    with pytest.raises(ValueError, match="boom"), AttentionLogitRecorder(model):
        model(torch.randn(1, 3, 8))
        assert _mode_stack_depth() == 1
        raise ValueError("boom")
    assert _mode_stack_depth() == 0
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    # The forward itself raising inside a hooked module: same clean exit.
    with pytest.raises(RuntimeError), AttentionLogitRecorder(model):
        model(torch.randn(1, 3, 5))  # wrong width
    assert _mode_stack_depth() == 0
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_recorder_skips_a_failing_statistic_without_breaking_the_forward(monkeypatch):
    model = TwoBlocks()
    x = torch.randn(1, 3, 8)
    expected = model(x)

    def broken(*args, **kwargs):
        raise IndexError("exotic input")

    monkeypatch.setattr(logits_module, "attention_logit_stats", broken)
    with AttentionLogitRecorder(model) as rec:
        out = model(x)
    assert torch.equal(out, expected)
    assert rec.num_calls == 0 and set(rec.errors) == {"attn", "blocks.0", "blocks.1"}
    assert "IndexError: exotic input" in rec.errors["blocks.0"]


def test_recorder_on_a_transformer_encoder_and_validation():
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    with AttentionLogitRecorder(enc) as rec:
        enc(torch.randn(2, 5, 8), is_causal=True, mask=nn.Transformer.generate_square_subsequent_mask(5))
    assert sorted(rec.stats()) == ["layers.0.self_attn", "layers.1.self_attn"] and rec.num_calls == 2
    with pytest.raises(ValueError, match="max_queries"):
        AttentionLogitRecorder(enc, max_queries=0)
    rec = AttentionLogitRecorder(enc)
    with rec, pytest.raises(RuntimeError, match="re-entrant"), rec:
        pass
    assert _mode_stack_depth() == 0


# -- output logits --------------------------------------------------------------------------------


def test_output_logsumexp_matches_torch_float64():
    z = 10 * torch.randn(3, 7, 50, generator=_gen(13), dtype=torch.float64)
    s = output_logit_stats(z)
    ref = torch.logsumexp(z, -1)
    torch.testing.assert_close(s.log_z_mean, ref.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.log_z_max, ref.max(), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.log_z_min, ref.min(), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.output_max, z.abs().max(), rtol=0, atol=0)
    assert s.num_rows == pytest.approx(21.0)
    bf = output_logit_stats(z.bfloat16())
    assert bf.log_z_mean.dtype == torch.float32
    torch.testing.assert_close(bf.log_z_mean.double(), torch.logsumexp(z.bfloat16().double(), -1).mean(),
                               rtol=1e-6, atol=1e-5)


def test_softmax_collapse_on_hand_built_rows():
    z = torch.zeros(4, 5)
    z[0, 1] = 200.0  # gap 200: exp(-200) underflows, top probability exactly 1
    z[1, 1] = 10.0  # gap 10: exp(-10) ~ 4.5e-5 per competitor, top probability < 1
    z[2, 1] = -300.0  # a very negative logit: the others share the mass
    z[3] = torch.tensor([0.0, 40.0, 39.0, -5.0, 2.0])  # gap 1 to the runner-up
    s = output_logit_stats(z)
    assert s.softmax_collapse == pytest.approx(0.25, abs=1e-7)
    assert s.output_max == pytest.approx(300.0, abs=1e-4)


def test_softmax_collapse_is_a_float32_normaliser_of_exactly_one():
    gaps = torch.linspace(0, 40, 161)
    z = torch.zeros(161, 30)
    z[:, 0] = gaps  # one leader, 29 competitors at 0
    s = output_logit_stats(z)
    # Reference: the tail summed in float64, then 1 + t rounded to float32.
    tail = torch.exp(z.double()[:, 1:] - gaps.double()[:, None]).sum(-1)
    ref = ((1 + tail).float() == 1.0).float()
    torch.testing.assert_close(s.softmax_collapse, ref.mean(), rtol=0, atol=1e-6)
    # Threshold: 29 exp(-gap) <= 2^-24, gap >= 16.6 + log(29) = 20.0.
    assert 19.5 < float(gaps[ref == 1].min()) < 20.5
    # torch.softmax agrees away from the threshold (near it, it depends on its summation order).
    far = (gaps - 20.0).abs() > 2
    literal = torch.softmax(z, -1).amax(-1) == 1.0
    assert torch.equal(literal[far], ref[far] == 1)


def test_output_stats_valid_rows_and_nan():
    z = torch.randn(2, 3, 4, generator=_gen(14))
    valid = torch.tensor([[True, False, True], [False, False, True]])
    s = output_logit_stats(z, valid)
    ref = torch.logsumexp(z[valid], -1)
    torch.testing.assert_close(s.log_z_mean, ref.mean())
    torch.testing.assert_close(s.log_z_max, ref.max())
    torch.testing.assert_close(s.output_max, z[valid].abs().max())
    assert s.num_rows == pytest.approx(3.0)
    none = output_logit_stats(z, torch.zeros(2, 3, dtype=torch.bool))
    assert all(torch.isnan(getattr(none, f)) for f in ("log_z_mean", "log_z_max", "log_z_min", "output_max",
                                                        "softmax_collapse"))
    z[0, 0, 1] = math.nan
    assert torch.isnan(output_logit_stats(z).log_z_max) and torch.isnan(output_logit_stats(z).output_max)
    with pytest.raises(ValueError, match="valid"):
        output_logit_stats(z, valid[0])


def test_output_stats_in_chunks_match_one_pass(monkeypatch):
    z = torch.randn(37, 11, generator=_gen(15)) * 30
    whole = output_logit_stats(z)
    monkeypatch.setattr(logits_module, "_CHUNK_ELEMENTS", 50)  # 4 rows per chunk
    chunked = output_logit_stats(z)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_logit_statistics_make_no_host_sync_on_cuda():
    torch.manual_seed(0)
    model = TwoBlocks().cuda()
    x = torch.randn(2, 6, 8, device="cuda")
    z = torch.randn(4, 7, 50, device="cuda")
    valid = torch.rand(4, 7, device="cuda") > 0.2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with AttentionLogitRecorder(model, max_queries=4) as rec:
            model(x)
        out = output_logit_stats(z, valid)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not rec.errors and rec.num_calls == 3
    assert all(s.max_logit.is_cuda for s in rec.stats().values()) and out.log_z_mean.is_cuda


def test_softmax_collapse_is_nan_for_a_row_with_a_non_finite_logit_and_for_one_output():
    z = torch.tensor([[0.0, 200.0], [0.0, math.nan], [0.0, 10.0], [math.inf, 0.0]])
    assert math.isnan(float(output_logit_stats(z).softmax_collapse))  # NaN in, NaN out: never a healthy share
    assert float(output_logit_stats(z[[0, 2]]).softmax_collapse) == pytest.approx(0.5, abs=1e-12)  # finite rows
    valid = torch.tensor([True, False, True, False])  # the broken rows left out
    assert float(output_logit_stats(z, valid).softmax_collapse) == pytest.approx(0.5, abs=1e-12)
    one = output_logit_stats(torch.tensor([[3.0], [-2.0]]))  # one output: a softmax over it is meaningless
    assert math.isnan(float(one.softmax_collapse))
    assert float(one.output_max) == pytest.approx(3.0, abs=1e-12)


def test_compiled_regions_are_the_outermost_compiled_modules_and_the_recorder_hooks_nothing_inside():
    net = nn.Sequential(nn.Linear(4, 4), torch.compile(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))),
                        nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2))
    net[2].compile()  # in place: no wrapper, its own hooks are compiled with it
    assert list(compiled_regions(net)) == ["1", "2"]
    inside = [*net[1]._orig_mod.modules(), *net[2].modules()]
    with AttentionLogitRecorder(net) as recorder:
        assert recorder.compiled == ["1", "2"]
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in inside)
        assert net[0]._forward_pre_hooks and net[1]._forward_pre_hooks  # the wrapper's run eagerly
        assert net[2]._compiled_call_impl is not None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
