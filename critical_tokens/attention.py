"""Causal self-attention in query blocks: the teacher-forced passes' attention on a CPU, without the
upper triangle's work.

torch's CPU flash-attention kernel splits the keys into blocks of up to 512. For this project's
sequences (prompt + scratchpad: about 300 characters in the cpu presets, 725 at most in the RL
benchmark) one block holds nearly every key, so a causal mask hides the upper triangle of the scores
but the kernel still computes it: about half its work is for scores that the softmax then zeroes.
Here the queries are cut into blocks of ``QUERY_BLOCK`` rows, and each block attends over the keys up
to its own last position only, under the same mask cut to that square:

    attention(Q, K, V)[a:b] = softmax(Q[a:b] K[:b]^T / sqrt(D) + mask[a:b, :b]) V[:b]

which is the same masked softmax, since every key past b is masked for the queries before b. The
kernel then computes 69% of the scores at 300 tokens, 58% at 725 (n equal blocks: (n + 1) / (2 n));
a forward pass of `tiny` at 32 x 300 tokens took 12% less time on this project's CPU
(benchmarks/README.md, `study_run.py`). The results equal plain SDPA's up to float rounding (the
kernel sums over fewer masked zeros; tests/test_attention.py).

It is registered with transformers as the attention implementation ``"sdpa_causal_blocks"``
(transformers' ``AttentionInterface``, its masks built as for ``"sdpa"``), which :func:`use_causal_blocks`
sets on the project's GPT-2 models. Everything else goes to transformers' own SDPA function: a GPU
(whose kernels skip masked blocks themselves), a query of one token or a KV cache (decoding), a
sequence of one block, dropout, and a traced or compiled graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "sdpa_causal_blocks"
QUERY_BLOCK = 128  # query rows per block: 300 tokens -> 3 blocks, 725 -> 6


def causal_blocks_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query, key, value (B, H, T, D), ``attention_mask``
    a boolean (B or 1, 1, T, T) mask (True: attended) or None (causal); returns (B, T, H, D) and no
    attention weights. Self-attention of T > QUERY_BLOCK queries on a CPU in query blocks; anything
    else through transformers' SDPA function."""
    T = query.shape[2]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal  # as transformers' SDPA function decides it
    plain = (query.is_cuda or T <= QUERY_BLOCK or key.shape[2] != T or dropout > 0 or not causal or kwargs.get("position_bias") is not None
             or torch.compiler.is_compiling() or torch.jit.is_tracing())
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    mask = attention_mask
    if mask is None:  # no padding: the causal mask alone
        mask = torch.ones((T, T), dtype=torch.bool, device=query.device).tril()[None, None]  # (1, 1, T, T)
    blocks = []
    for start in range(0, T, QUERY_BLOCK):
        end = min(T, start + QUERY_BLOCK)
        blocks.append(F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, :end], value[:, :, :end],
                                                     attn_mask=mask[..., start:end, :end], scale=scaling))  # (B, H, end - start, D)
    return torch.cat(blocks, dim=2).transpose(1, 2).contiguous(), None  # (B, T, H, D)


AttentionInterface.register(NAME, causal_blocks_attention)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_causal_blocks(model):
    """Sets ``model``'s attention to :func:`causal_blocks_attention` (not saved with the model: a
    checkpoint stays a plain GPT-2 that transformers loads with its own attention); returns it."""
    model.set_attn_implementation(NAME)
    return model
