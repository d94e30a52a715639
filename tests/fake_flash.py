"""Fake FlashAttention kernels for CPU tests: the exact math of flash_attn_func / flash_attn_varlen_func
(causal attention per row, or per sample between cu_seqlens boundaries; grouped-query heads shared)
through PyTorch SDPA, with every call recorded. Swapped into transformers where it loads the real
ones (modeling_flash_attention_utils.lazy_import_flash_attention), so a model run with
attn_implementation="flash_attention_2" takes transformers' own flash code paths on a CPU."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class FakeFlash:
    def __init__(self):
        self.dense_calls = 0
        self.varlen_calls: list[dict] = []

    @staticmethod
    def _attend(q, k, v, causal, softmax_scale):  # (L, H, D) each, k/v with H_kv heads
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale, enable_gqa=k.shape[0] != q.shape[0])
        return out.transpose(0, 1)

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, deterministic=False):
        self.dense_calls += 1
        return torch.stack([self._attend(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
        self.varlen_calls.append({"cu_seqlens_q": cu_seqlens_q.tolist(), "max_seqlen_q": max_seqlen_q})
        bounds = cu_seqlens_q.tolist()
        return torch.cat([self._attend(q[a:b], k[a:b], v[a:b], causal, softmax_scale) for a, b in zip(bounds, bounds[1:])])


@contextlib.contextmanager
def fake_flash_attention(monkeypatch):
    """Inside: transformers runs flash_attention_2 with FakeFlash's kernels (yielded), and a model
    may be built with attn_implementation="flash_attention_2" without flash-attn installed."""
    import transformers.modeling_flash_attention_utils as fa
    from transformers.modeling_utils import PreTrainedModel

    fake = FakeFlash()
    process = fa._lazy_define_process_function(fake.flash_attn_varlen_func)
    kernels = ((fake.flash_attn_func, fake.flash_attn_varlen_func, None, fa._pad_input, fa._unpad_input), (process, dict))
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *args, **kwargs: kernels)
    checked = PreTrainedModel._check_and_adjust_attn_implementation
    monkeypatch.setattr(PreTrainedModel, "_check_and_adjust_attn_implementation",
                        lambda self, requested, *a, **k: requested if requested == "flash_attention_2" else checked(self, requested, *a, **k))
    yield fake
