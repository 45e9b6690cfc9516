"""The block-causal attention of teacher-forced passes (critical_tokens/attention.py): the same
attention as plain SDPA, in blocks that stop at their own last key."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from critical_tokens import attention
from critical_tokens.attention import QUERY_BLOCK, causal_blocks_attention
from critical_tokens.model import build_model, load_model
from critical_tokens.tokenizer import build_tokenizer


def padded_mask(B: int, T: int, left: list[int], right: list[int]) -> torch.Tensor:
    """transformers' boolean SDPA mask (B, 1, T, T): causal, minus left-padded keys and right-padded keys,
    each padding query attending to itself (as the decoder's and transformers' masks keep a row defined)."""
    keys = torch.ones((B, T), dtype=torch.bool)
    for b in range(B):
        keys[b, : left[b]] = False
        keys[b, T - right[b] :] = False
    return (torch.ones((T, T), dtype=torch.bool).tril() & keys[:, None, None, :]) | torch.eye(T, dtype=torch.bool)


@pytest.mark.parametrize("T", [QUERY_BLOCK + 1, 300, 2 * QUERY_BLOCK])
@pytest.mark.parametrize("masked", [True, False])
def test_equals_plain_sdpa_forward_and_backward(T, masked):
    torch.manual_seed(0)
    B, H, D = 3, 2, 8
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    mask = padded_mask(B, T, left=[0, 5, 2], right=[0, 40, 7]) if masked else None
    module = torch.nn.Module()  # transformers passes the attention module; only its is_causal is read
    ours, weights = causal_blocks_attention(module, q, k, v, mask, scaling=D**-0.5)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=D**-0.5).transpose(1, 2)
    assert weights is None and ours.shape == (B, T, H, D)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(plain)
    ours_grads = torch.autograd.grad(ours, (q, k, v), g)
    plain_grads = torch.autograd.grad(plain, (q, k, v), g)
    for a, b in zip(ours_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_each_block_attends_up_to_its_own_end(monkeypatch):
    """The work saved: a block of queries a..b reads keys 0..b only (300 queries: 128, 256, 300 keys)."""
    seen = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((q.shape[2], k.shape[2], kwargs["attn_mask"].shape[-2:]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    q = k = v = torch.randn(1, 1, 300, 4)
    causal_blocks_attention(torch.nn.Module(), q, k, v, None)
    assert seen == [(128, 128, (128, 128)), (128, 256, (128, 256)), (44, 300, (44, 300))]


def test_short_sequences_and_decoding_steps_go_to_transformers_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **kw: calls.append(a[1].shape) or ("plain", None))
    module = torch.nn.Module()
    short = torch.randn(1, 1, QUERY_BLOCK, 4)
    assert causal_blocks_attention(module, short, short, short, None)[0] == "plain"
    step, cache = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 300, 4)  # one query over a KV cache
    assert causal_blocks_attention(module, step, cache, cache, None)[0] == "plain"
    long = torch.randn(1, 1, 300, 4)
    assert causal_blocks_attention(module, long, long, long, None, dropout=0.1)[0] == "plain"
    assert len(calls) == 3


def test_the_models_use_it_and_save_a_plain_gpt2(tmp_path):
    """Built and loaded models attend in blocks, with the logits of transformers' own SDPA; the saved
    checkpoint does not name the implementation, so plain transformers loads it with its own."""
    tokenizer = build_tokenizer()
    model = build_model("micro", tokenizer, 2).eval()
    assert model.config._attn_implementation == attention.NAME
    ids = torch.randint(0, len(tokenizer), (2, 200))
    mask = torch.ones_like(ids)
    mask[1, 150:] = 0  # right padding, as an RL batch's shorter episode
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        plain = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], plain[valid], rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    assert attention.NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    assert GPT2LMHeadModel.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    assert load_model(tmp_path).config._attn_implementation == attention.NAME
