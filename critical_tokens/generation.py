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


class _Forward:
    """The model side of the decoding loop: the prefill, then one forward pass per generated token.

    ``logits`` (R, V) are the next-token logits of the R rows still in the decoder; ``rows`` (R,) are
    their rows of the batch, or None for all B of them (R = B). Only the CPU static path lets rows
    leave (:meth:`drop_finished`). "hf" keeps the KV cache, the attention mask and the next positions
    here; "static" keeps them in its :class:`static_decode.StaticDecoder`.
    """

    def __init__(self, model, input_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, static: bool):
        device = input_ids.device
        self.model, self.static, self.device_type, self.gpu = model, static, device.type, device.type == "cuda"
        B, P = input_ids.shape  # (B, P) left-padded prompts
        self.prompt_length = P
        self.rows: torch.Tensor | None = None
        position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        if static and self.gpu:  # one cache length per 64 tokens, so that a run's calls share a captured graph
            self.decoder = static_decode.decoder_for(model, B, 64 * -(-(P + max_new_tokens) // 64))
            self.logits = self.decoder.prefill(input_ids, prompt_mask, position_ids)  # (B, V)
        elif static:  # a CPU has no graph to reuse: a decoder of this call's size, whose rows can leave
            self.decoder = static_decode.StaticDecoder(model, B, P + max_new_tokens)
            self.logits = self.decoder.prefill(input_ids, prompt_mask, position_ids)  # (B, V)
            self.rows = torch.arange(B)
        else:  # model(...) calls
            self.attention_mask = torch.cat([prompt_mask, torch.ones((B, max_new_tokens), dtype=torch.long, device=device)], 1)
            self.cache_arg = _cache_argument(model)
            cache = _preallocated_cache(model, P + max_new_tokens) if self.cache_arg == "cache" else None
            self._call(input_ids=input_ids, attention_mask=prompt_mask, position_ids=position_ids,
                       **({self.cache_arg: cache} if cache is not None else {}))
            self.next_position = position_ids[:, -1:] + 1  # (B, 1)

    def _call(self, **inputs) -> None:
        """One ``model(...)`` call (bf16 autocast on a GPU): keeps its output (the cache) and last logits."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.gpu):
            self.out = self.model(**inputs, use_cache=True)
        self.logits = self.out.logits[:, -1].float()  # (B, V)

    def drop_finished(self, done: torch.Tensor) -> None:
        """CPU static path: once an eighth of the running rows are ``done`` (B,), the finished ones leave."""
        if self.rows is not None and int(done[self.rows].sum()) >= max(1, len(self.rows) // 8):
            running = (~done[self.rows]).nonzero()[:, 0]
            self.decoder.keep(running)
            self.rows = self.rows[running]

    def step(self, token: torch.Tensor, t: int) -> None:
        """Feeds the batch's tokens (B,) of position ``t``; ``logits`` become the next position's."""
        if self.static:
            self.logits = self.decoder.step(token if self.rows is None else token[self.rows])
            return
        past = self.out["cache"] if "cache" in self.out else self.out.past_key_values
        self._call(input_ids=token[:, None], attention_mask=self.attention_mask[:, : self.prompt_length + t + 1],
                   position_ids=self.next_position, **{self.cache_arg: past})
        self.next_position = self.next_position + 1


def _next_token(logits: torch.Tensor, temperature: float | torch.Tensor, generator, noise_rows, batch: int,
                rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, log-prob) of each running row, both (R,), from its logits (R, V): greedy, or Gumbel-max
    sampling at ``temperature`` with one (``batch``, V) block of uniform noise from ``generator`` (or
    ``noise_rows[0]`` rows, of which ``noise_rows[1]`` are kept), of which ``rows`` are kept. A
    ``temperature`` per row (B,): `_next_token_per_row`."""
    if isinstance(temperature, torch.Tensor):
        return _next_token_per_row(logits, temperature, generator, rows)
    if temperature > 0:
        logp = torch.log_softmax(logits / temperature, dim=-1)  # (R, V)
        if noise_rows is None:
            u = torch.rand((batch, logp.shape[1]), generator=generator, device="cpu")
        else:
            u = torch.rand((noise_rows[0], logp.shape[1]), generator=generator, device="cpu")[noise_rows[1]]
        u = u.pin_memory().to(logits.device, non_blocking=True) if logits.is_cuda else u
        u = u if rows is None else u[rows]
        token = (logp + _gumbel(u)).argmax(-1)
    else:
        logp = torch.log_softmax(logits, dim=-1)
        token = logp.argmax(-1)
    return token, logp.gather(-1, token[:, None])[:, 0]


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel noise -log(-log u) from uniform noise u: argmax(log p + g) samples from p."""
    return -torch.log(-torch.log(u.clamp_min(1e-20)))


def _next_token_per_row(logits: torch.Tensor, temperature: torch.Tensor, generator,
                        rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`_next_token` with one temperature per row of the batch (B,), 0 for greedy. The noise is one
    (S, V) block for the S sampled rows, in their order: each sampled row gets the noise, hence the
    token, that a call on the sampled rows alone would give it, and a greedy row the argmax (log-probs
    at temperature 1)."""
    sampled = temperature > 0  # (B,)
    running = temperature if rows is None else temperature[rows]  # (R,)
    logp = torch.log_softmax(logits / torch.where(running > 0, running, 1.0).to(logits.device)[:, None], dim=-1)  # (R, V)
    u = torch.rand((int(sampled.sum()), logp.shape[1]), generator=generator, device="cpu")
    gumbel = torch.zeros((len(temperature), logp.shape[1]))
    gumbel[sampled] = _gumbel(u)
    gumbel = (gumbel if rows is None else gumbel[rows]).to(logits.device)
    token = (logp + gumbel).argmax(-1)
    return token, logp.gather(-1, token[:, None])[:, 0]


class _Record:
    """The generated tokens (B, T) with their log-probs and certainties, and the per-row stop rule
    (T = ``max_new_tokens``); once a row is ``done`` it gets padding (log-prob and certainty 0)."""

    def __init__(self, batch: int, max_new_tokens: int, pad_token_id: int, with_certainty: bool, stop_after: Sequence[int], device):
        B, T = batch, max_new_tokens
        self.pad_token_id = pad_token_id
        self.tokens = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)  # (B, T)
        self.logprobs = torch.zeros((B, T), device=device)
        self.certainty = torch.zeros((B, T), device=device) if with_certainty else None
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)  # stopped by the stop rule
        self.marker = torch.tensor(list(stop_after), dtype=torch.long, device=device)
        self.after_marker = torch.full((B,), len(self.marker) == 0, dtype=torch.bool, device=device)  # stop_after seen
        self.lengths = torch.zeros(B, dtype=torch.long, device=device)  # generated tokens, the stop token included

    def write(self, t: int, token: torch.Tensor, logprobs: torch.Tensor, certainty: torch.Tensor | None) -> torch.Tensor:
        """Records position ``t`` of every row (each (B,)); returns the tokens with the done rows padded."""
        token = torch.where(self.done, self.pad_token_id, token)  # (B,)
        self.tokens[:, t] = token
        self.logprobs[:, t] = logprobs.masked_fill(self.done, 0.0)
        if self.certainty is not None:
            self.certainty[:, t] = certainty.masked_fill(self.done, 0.0)
        self.lengths += (~self.done).long()
        return token

    def apply_stop_rule(self, t: int, token: torch.Tensor, eos_token_id: int, stop_token_id: int | None) -> None:
        """A row stops at end-of-text, or at ``stop_token_id`` once it has generated the marker."""
        stop = token == eos_token_id
        if stop_token_id is not None:
            stop |= self.after_marker & (token == stop_token_id)
        n = len(self.marker)
        if n and t + 1 >= n:
            self.after_marker |= (self.tokens[:, t + 1 - n : t + 1] == self.marker).all(-1)
        self.finished |= stop & ~self.done
        self.done |= stop

    def result(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Generation:
        """The Generation of these prompts (B, P), completions cut to the longest row's length T."""
        B, P = input_ids.shape
        T = int(self.lengths.max().item()) if B else 0
        completion_mask = torch.arange(T, device=input_ids.device)[None, :] < self.lengths[:, None]  # (B, T)
        return Generation(
            sequences=torch.cat([input_ids, self.tokens[:, :T]], 1),
            attention_mask=torch.cat([prompt_mask, completion_mask.long()], 1),
            prompt_length=P,
            completion_mask=completion_mask,
            logprobs=self.logprobs[:, :T],
            certainty=None if self.certainty is None else self.certainty[:, :T],
            finished=self.finished,
        )


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    eos_token_id: int,
    pad_token_id: int,
    temperature: float | Sequence[float] = 0.0,
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

    ``temperature`` and ``max_new_tokens`` may also be given per row (B values), so that greedy and
    sampled rows, and rows of different lengths, share one call: the sampled rows (temperature > 0)
    then draw one (S, V) block of noise per step for their S rows alone, so each row's tokens are those
    of a call on its own kind of rows (up to the last bits of the floats, which depend on the batch).

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
    row_limits = None if isinstance(max_new_tokens, int) else torch.as_tensor(max_new_tokens, device=device)  # (B,)
    max_new_tokens = max_new_tokens if row_limits is None else int(row_limits.max())
    if not isinstance(temperature, (int, float)):
        temperature = torch.as_tensor(temperature, dtype=torch.float)  # (B,)
        if noise_rows is not None:
            raise ValueError("a temperature per row and noise_rows (a rank's share of a batch) do not go together")
    check_every = GPU_CHECK_EVERY if device.type == "cuda" and noise_rows is None else 1
    if decoder not in ("auto", "hf", "static"):
        raise ValueError(f"decoder must be auto, hf or static, got {decoder!r}")
    static = decoder == "static" or (decoder == "auto" and static_decode.supports(model))
    input_ids, prompt_mask = left_pad(prompts, pad_token_id, device)  # (B, P)
    B = input_ids.shape[0]
    record = _Record(B, max_new_tokens, pad_token_id, bool(certainty_method), stop_after, device)
    forward = _Forward(model, input_ids, prompt_mask, max_new_tokens, static)
    for t in range(max_new_tokens):
        logits, rows = forward.logits, forward.rows  # (R, V) for the R rows running, R = B unless rows
        token, step_logprobs = _next_token(logits, temperature, generator, noise_rows, B, rows)  # (R,)
        step_certainty = kl.certainty(logits, certainty_method, certainty_temperature) if certainty_method else None
        if rows is not None:  # back to the whole batch: the rows that left are done (padding)
            token, step_logprobs, step_certainty = (
                None if x is None else torch.zeros(B, dtype=x.dtype).index_copy_(0, rows, x) for x in (token, step_logprobs, step_certainty))
        token = record.write(t, token, step_logprobs, step_certainty)  # (B,)
        record.apply_stop_rule(t, token, eos_token_id, stop_token_id)
        if row_limits is not None:
            record.done |= t + 1 >= row_limits  # a row at its own limit: done, not finished
        if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(record.done.all())):
            break
        forward.drop_finished(record.done)
        forward.step(token, t)
    return record.result(input_ids, prompt_mask)


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
