"""Batched generation with the KV cache: greedy or temperature sampling, per-row stopping.

Written as a short explicit loop over ``model(...)`` calls (instead of ``model.generate``) because
the RL loop needs, for every generated token, the sampling log-probability and optionally the
model's certainty, and because a lean loop has far less per-token overhead on a CPU
(``benchmarks/generation.py`` measures it). Rows of different prompt lengths are left-padded and
get correct position ids, so a row's tokens do not depend on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import inspect

import torch

from . import kl, static_decode
from .tokenizer import encode


GPU_CHECK_EVERY = 16  # on a GPU: tokens between the host's checks that every row has stopped


@dataclass
class Generation:
    sequences: torch.Tensor  # (B, P+T) prompts left-padded, completions right-padded
    attention_mask: torch.Tensor  # (B, P+T) 1 on prompt and completion tokens
    prompt_length: int  # P
    completion_mask: torch.Tensor  # (B, T) bool: generated tokens (the stop token included)
    logprobs: torch.Tensor  # (B, T) log-prob of each generated token at the sampling temperature
    certainty: torch.Tensor | None  # (B, T) the generating model's certainty at each step
    finished: torch.Tensor  # (B,) bool: stopped by the stop rule (False: hit the length limit)

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]  # (B, T)

    def completions(self, tokenizer) -> list[str]:
        ids = self.completion_ids.tolist()
        lengths = self.completion_mask.sum(-1).tolist()
        return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(ids, lengths)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _cache_argument(model) -> str:
    """transformers 5.x calls the KV cache ``cache``; 4.x called it ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _preallocated_cache(model, max_length: int):
    """A KV cache whose buffers are allocated once for the whole generation and written in place.

    transformers' default (dynamic) cache concatenates every layer's keys and values at every token,
    and its static cache attends over the full maximum length at every step; writing into a
    pre-allocated buffer and attending over the filled part only is 1.6x faster per decoding step on
    the tiny preset at 725 tokens (same tokens). ``None`` (the default cache) where this version of
    transformers has no ``DynamicLayer`` to build it from.
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None
    if not hasattr(DynamicLayer, "lazy_initialization") or not hasattr(model, "config"):
        return None

    class PreallocatedLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states, *args, **kwargs):
            B, H, _, D = key_states.shape  # (B, heads, T, head_dim)
            self.dtype, self.device = key_states.dtype, key_states.device
            self.key_buffer = key_states.new_empty((B, H, max_length, D))
            self.value_buffer = value_states.new_empty((B, H, max_length, D))
            self.length = 0
            self.keys, self.values = self.key_buffer[:, :, :0], self.value_buffer[:, :, :0]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            self.key_buffer[:, :, self.length : self.length + n] = key_states
            self.value_buffer[:, :, self.length : self.length + n] = value_states
            self.length += n
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]
            return self.keys, self.values

        def get_seq_length(self, *args, **kwargs) -> int:
            return self.length if self.is_initialized else 0

    cache = DynamicCache()
    cache.layers = [PreallocatedLayer() for _ in range(model.config.num_hidden_layers)]
    return cache


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 0.0,
    stop_token_id: int | None = None,
    stop_after: Sequence[int] = (),
    certainty_method: str | None = None,
    certainty_temperature: float = 1.0,
    generator: torch.Generator | None = None,
    noise_rows: tuple[int, slice] | None = None,
    decoder: str = "auto",
) -> Generation:
    """Generates a completion for every prompt (lists of token ids) in one batch.

    ``temperature`` 0 is greedy (log-probs then at temperature 1); otherwise tokens are sampled from
    softmax(logits / temperature). A row stops at end-of-text, or at the first ``stop_token_id``
    generated after the token sequence ``stop_after`` (for the addition task: the newline after the
    result line, i.e. after ``"</scratch>\\n"``), or after ``max_new_tokens`` (``finished`` False).

    ``noise_rows`` = (B_all, rows): the prompts are ``rows`` of a batch of B_all (a rank's share under
    torchrun). The sampling noise is drawn for the whole batch and these rows kept, so the shares
    sample the tokens the whole batch would; the generator has then drawn one (B_all, V) block per
    generated position (``completion_mask.shape[1]`` of them).

    On a GPU the forward passes run in bf16 autocast, the sampling noise goes over in pinned memory
    without waiting, and (outside torchrun) the host asks whether every row is done only every
    ``GPU_CHECK_EVERY`` tokens, so it queues the next steps while the GPU works; the extra steps
    after the last row stopped generate padding only (the tokens are the same, the generator has
    drawn up to ``GPU_CHECK_EVERY - 1`` more blocks).

    ``decoder``: "hf" runs ``model(...)`` with the pre-allocated cache; "static" runs a GPT-2 through
    :class:`static_decode.StaticDecoder` (on CUDA each token is one CUDA-graph replay; on a CPU each
    step attends over the written slots only, and the rows that have finished leave the batch as
    soon as an eighth of it has); "auto" is "static" for a GPT-2 and "hf" for any other model.
    Leaving rows out changes no row's tokens: each row's noise is its own row of the (B, V) block
    drawn at every step, whatever else is still running.
    """
    device = next(model.parameters()).device
    gpu = device.type == "cuda"
    check_every = GPU_CHECK_EVERY if gpu and noise_rows is None else 1
    if decoder not in ("auto", "hf", "static"):
        raise ValueError(f"decoder must be auto, hf or static, got {decoder!r}")
    static = decoder == "static" or (decoder == "auto" and static_decode.supports(model))
    input_ids, prompt_mask = left_pad(prompts, pad_token_id, device)  # (B, P)
    B, P = input_ids.shape
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)  # (B, T)
    logprobs = torch.zeros((B, max_new_tokens), device=device)
    certainty = torch.zeros((B, max_new_tokens), device=device) if certainty_method else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    marker = torch.tensor(list(stop_after), dtype=torch.long, device=device)
    after_marker = torch.full((B,), len(marker) == 0, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)

    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
    rows = None  # CPU static path: the batch rows still in the decoder (None: all of them)
    if static and gpu:  # one cache length per 64 tokens, so that a run's calls share a captured graph
        step_decoder = static_decode.decoder_for(model, B, 64 * -(-(P + max_new_tokens) // 64))
        logits = step_decoder.prefill(input_ids, prompt_mask, position_ids)  # (B, V)
    elif static:  # a CPU has no graph to reuse: a decoder of this call's size, whose rows can leave
        step_decoder = static_decode.StaticDecoder(model, B, P + max_new_tokens)
        logits = step_decoder.prefill(input_ids, prompt_mask, position_ids)  # (B, V)
        rows = torch.arange(B)
    else:  # model(...) calls: the cache, the attention mask and the next positions are kept here
        attention_mask = torch.cat([prompt_mask, torch.ones((B, max_new_tokens), dtype=torch.long, device=device)], 1)
        cache_arg = _cache_argument(model)
        cache = _preallocated_cache(model, P + max_new_tokens) if cache_arg == "cache" else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            out = model(input_ids=input_ids, attention_mask=prompt_mask, position_ids=position_ids, use_cache=True,
                        **({cache_arg: cache} if cache is not None else {}))
        next_position = position_ids[:, -1:] + 1  # (B, 1)
    for t in range(max_new_tokens):
        if not static:
            logits = out.logits[:, -1].float()  # (B, V)
        if temperature > 0:
            logp = torch.log_softmax(logits / temperature, dim=-1)  # (B, V), or (R, V) for the R rows left
            if noise_rows is None:
                u = torch.rand((B, logp.shape[1]), generator=generator, device="cpu")
            else:
                u = torch.rand((noise_rows[0], logp.shape[1]), generator=generator, device="cpu")[noise_rows[1]]
            u = u.pin_memory().to(device, non_blocking=True) if gpu else u
            u = u if rows is None else u[rows]
            token = (logp - torch.log(-torch.log(u.clamp_min(1e-20)))).argmax(-1)  # Gumbel-max sampling
        else:
            logp = torch.log_softmax(logits, dim=-1)
            token = logp.argmax(-1)
        step_logprobs = logp.gather(-1, token[:, None])[:, 0]
        step_certainty = None if certainty is None else kl.certainty(logits, certainty_method, certainty_temperature)
        if rows is not None:  # back to the whole batch: the rows that left are done (padding)
            token, step_logprobs, step_certainty = (
                None if x is None else torch.zeros(B, dtype=x.dtype).index_copy_(0, rows, x) for x in (token, step_logprobs, step_certainty))
        token = torch.where(done, pad_token_id, token)  # (B,)
        tokens[:, t] = token
        logprobs[:, t] = step_logprobs.masked_fill(done, 0.0)
        if certainty is not None:
            certainty[:, t] = step_certainty.masked_fill(done, 0.0)
        lengths += (~done).long()

        stop = token == eos_token_id
        if stop_token_id is not None:
            stop |= after_marker & (token == stop_token_id)
        if len(marker) and t + 1 >= len(marker):
            after_marker |= (tokens[:, t + 1 - len(marker) : t + 1] == marker).all(-1)
        finished |= stop & ~done
        done |= stop
        if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        if rows is not None and int(done[rows].sum()) >= max(1, len(rows) // 8):  # an eighth has finished: they leave
            running = (~done[rows]).nonzero()[:, 0]
            step_decoder.keep(running)
            rows = rows[running]
        if static:
            logits = step_decoder.step(token if rows is None else token[rows])
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            out = model(
                input_ids=token[:, None],
                attention_mask=attention_mask[:, : P + t + 1],
                position_ids=next_position,
                use_cache=True,
                **{cache_arg: out["cache"] if "cache" in out else out.past_key_values},
            )
        next_position = next_position + 1

    T = int(lengths.max().item()) if B else 0
    completion_mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # (B, T)
    sequences = torch.cat([input_ids, tokens[:, :T]], 1)
    full_mask = torch.cat([prompt_mask, completion_mask.long()], 1)
    return Generation(
        sequences=sequences,
        attention_mask=full_mask,
        prompt_length=P,
        completion_mask=completion_mask,
        logprobs=logprobs[:, :T],
        certainty=None if certainty is None else certainty[:, :T],
        finished=finished,
    )


def concatenate(parts: Sequence[Generation], pad_token_id: int) -> Generation:
    """One Generation of the rows of ``parts`` in order (the ranks' shares of a batch under torchrun),
    prompts left-padded to the longest and completions right-padded to the longest, as one call of
    :func:`generate` on the whole batch lays them out."""
    P = max(g.prompt_length for g in parts)
    T = max(g.completion_mask.shape[1] for g in parts)

    def pad(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (left, right), value=value)

    rows = [(g, P - g.prompt_length, T - g.completion_mask.shape[1]) for g in parts]
    return Generation(
        sequences=torch.cat([pad(g.sequences, left, right, pad_token_id) for g, left, right in rows]),  # (B, P+T)
        attention_mask=torch.cat([pad(g.attention_mask, left, right, 0) for g, left, right in rows]),
        prompt_length=P,
        completion_mask=torch.cat([pad(g.completion_mask.long(), 0, right, 0) for g, _, right in rows]).bool(),  # (B, T)
        logprobs=torch.cat([pad(g.logprobs, 0, right, 0.0) for g, _, right in rows]),
        certainty=None if parts[0].certainty is None else torch.cat([pad(g.certainty, 0, right, 0.0) for g, _, right in rows]),
        finished=torch.cat([g.finished for g in parts]),
    )


def addition_stop_rule(tokenizer) -> dict:
    """Keyword arguments of :func:`generate` that end an addition episode at the newline after the
    result line (docs/method.md section 1)."""
    return dict(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        stop_token_id=encode(tokenizer, "\n")[0],
        stop_after=encode(tokenizer, "</scratch>\n"),
    )
