"""GPT-2 decoding with static shapes, so that one decoding step can be replayed as a CUDA graph.

On a GPU, the generation loop of `generation.generate` through ``model(...)`` spends far more time in
Python and kernel launches than in the GPU's work: one H100 measured about 19 ms per token for the
85M model at a batch of 128 (benchmarks/README.md), where the arithmetic and the KV-cache reads take
about 1 ms. A :class:`StaticDecoder` keeps every shape of a step fixed:

- a KV cache per layer of the whole length, (B, H, L, D), written in place at slot ``slot``;
- every step attends over all L slots under a (B, L) mask of the slots written so far (left padding
  of the prompt is masked; each row's position ids are its own);
- the step reads its token, position and slot from buffers and advances them itself.

So on a GPU the step is captured once per (batch, length) as a ``torch.cuda.CUDAGraph`` and each
token costs one graph replay. On a CPU it runs as plain eager code (the tests check it against
transformers' logits) with three savings that a graph's fixed shapes forbid:

- a step attends over the chunks of slots written so far only (not all L);
- :meth:`StaticDecoder.keep` drops the rows that have finished;
- the cache is a list of chunks of ``CHUNK`` slots, each (layers, B, H, CHUNK, D), added as the slots
  fill, so that the keys and values a step reads are whole contiguous blocks. Reading the KV cache is
  most of a CPU decoding step (4 KB per row, layer pair and slot for ``tiny``), and a batched matrix
  product over the first ``span`` slots of a (B, H, L, D) cache, blocks ``L * D`` apart, ran 1.3-2.1x
  slower on this project's CPU than over contiguous blocks (`benchmarks/profile_decode.py --layouts`). The
  attention is the plain softmax(q k^T / sqrt(D) + mask) v, its scores concatenated over the chunks.

The transformer's own modules (``ln_1``, ``c_attn``, ``c_proj``, ``mlp``, ``ln_f``, ``lm_head``) do
the work; only the attention over the static cache and the residual wiring are written here (GPT-2's
pre-LayerNorm block; Radford et al. 2019).
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F

CHUNK = 64  # slots per block of the CPU's KV cache


def supports(model) -> bool:
    """True for a transformers GPT-2 whose attention is the plain scaled dot product."""
    c = getattr(model, "config", None)
    return (getattr(c, "model_type", None) == "gpt2" and c.scale_attn_weights and not c.scale_attn_by_inverse_layer_idx
            and not c.reorder_and_upcast_attn)


class StaticDecoder:
    """Prefill (eager) and one-token steps (graph-replayable) over a static KV cache for ``model``.

    ``batch`` rows, ``length`` cache slots (prompt + new tokens). On CUDA the step runs under bf16
    autocast and is captured as a CUDA graph at the first :meth:`step` after a :meth:`prefill`.
    """

    def __init__(self, model, batch: int, length: int):
        c = model.config
        # Kept on the model (decoder_for): a weak reference back, so that a model and its decoders
        # (their caches and graphs hold GPU memory) go together without waiting for the cycle collector.
        self._model = weakref.ref(model)
        self.batch, self.length = batch, length
        self.heads = c.n_head
        self.device = next(model.parameters()).device
        self.gpu = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.gpu else next(model.parameters()).dtype
        if self.gpu:
            shape = (c.n_layer, batch, c.n_head, length, c.n_embd // c.n_head)
            self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)  # (layers, B, H, L, D)
            self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        else:
            self.length = length = CHUNK * -(-length // CHUNK)
            self.key_chunks: list[torch.Tensor] = []  # each (layers, B, H, CHUNK, D)
            self.value_chunks: list[torch.Tensor] = []
        self.key_mask = torch.zeros((batch, length), dtype=torch.bool, device=self.device)  # (B, L) slots written
        self.token = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,) the step's input token
        self.position = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,) its position id
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)  # the cache slot it is written to
        self.logits = None  # (B, V) the step's output (a graph's static output on CUDA)
        self.graph: torch.cuda.CUDAGraph | None | bool = None  # False: the capture failed, steps run eager

    @property
    def model(self):
        return self._model()

    def _blocks(self, h, slots, mask):
        """The transformer blocks on hidden states (B, T, C) written at cache ``slots`` (T,), attending
        under ``mask`` (B, 1, T, L'), where L' = the cache prefix the mask covers."""
        B, T, C = h.shape
        H, D = self.heads, C // self.heads
        bias = None if self.gpu else _additive_bias(mask, CHUNK * -(-mask.shape[-1] // CHUNK))  # (B, 1, T, chunks * CHUNK)
        for i, block in enumerate(self.model.transformer.h):
            q, k, v = block.attn.c_attn(block.ln_1(h)).split(C, dim=2)  # (B, T, C) each
            q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
            if self.gpu:
                self.keys[i].index_copy_(2, slots, k.to(self.keys.dtype))
                self.values[i].index_copy_(2, slots, v.to(self.values.dtype))
                span = mask.shape[-1]
                attended = F.scaled_dot_product_attention(q, self.keys[i, :, :, :span].to(q.dtype),
                                                          self.values[i, :, :, :span].to(q.dtype), attn_mask=mask)  # (B, H, T, D)
            else:
                self._write_chunks(i, int(slots[0]), k, v)
                attended = self._attend_chunks(i, q, bias)
            h = h + block.attn.c_proj(attended.transpose(1, 2).reshape(B, T, C))
            h = h + block.mlp(block.ln_2(h))
        return self.model.lm_head(self.model.transformer.ln_f(h))  # (B, T, V)

    def _write_chunks(self, layer: int, start: int, k, v) -> None:
        """CPU: keys and values (B, H, T, D) into slots start..start+T-1 of the chunked cache."""
        end = start + k.shape[2]
        for chunk in range(start // CHUNK, -(-end // CHUNK)):
            if chunk == len(self.key_chunks):  # zeros, not empty: a masked slot gets weight 0, and 0 * NaN is NaN
                shape = (len(self.model.transformer.h), self.batch, self.heads, CHUNK, k.shape[-1])
                self.key_chunks.append(torch.zeros(shape, dtype=self.dtype))
                self.value_chunks.append(torch.zeros(shape, dtype=self.dtype))
            first, last = max(start, chunk * CHUNK), min(end, (chunk + 1) * CHUNK)
            within = slice(first - chunk * CHUNK, last - chunk * CHUNK)
            self.key_chunks[chunk][layer, :, :, within] = k[:, :, first - start : last - start]
            self.value_chunks[chunk][layer, :, :, within] = v[:, :, first - start : last - start]

    def _attend_chunks(self, layer: int, q, bias):
        """CPU: softmax(q k^T / sqrt(D) + bias) v over the chunks that ``bias`` (B, 1, T, chunks * CHUNK)
        covers, for queries q (B, H, T, D); each chunk's keys and values are one contiguous block."""
        B, H, T, D = q.shape
        chunks = bias.shape[-1] // CHUNK
        q = (q * D**-0.5).reshape(B * H, T, D)
        keys = [self.key_chunks[j][layer].view(B * H, CHUNK, D) for j in range(chunks)]
        values = [self.value_chunks[j][layer].view(B * H, CHUNK, D) for j in range(chunks)]
        scores = torch.cat([torch.bmm(q, k.transpose(1, 2)) for k in keys], dim=-1)  # (B H, T, chunks CHUNK)
        weights = (scores.view(B, H, T, -1) + bias).softmax(-1).view(B * H, T, chunks, CHUNK)
        weights = weights.permute(2, 0, 1, 3).contiguous()  # (chunks, B H, T, CHUNK): each chunk's weights one block
        attended = torch.bmm(weights[0], values[0])  # (B H, T, D)
        for j in range(1, chunks):
            attended.baddbmm_(weights[j], values[j])
        return attended.view(B, H, T, D)

    def _embed(self, ids, positions):
        return self.model.transformer.wte(ids) + self.model.transformer.wpe(positions)

    @torch.no_grad()
    def prefill(self, input_ids, prompt_mask, position_ids) -> torch.Tensor:
        """The left-padded prompts (B, P) into cache slots 0..P-1; returns the last position's logits (B, V)."""
        B, P = input_ids.shape
        self.key_mask.zero_()
        self.key_mask[:, :P] = prompt_mask.bool()
        if not self.gpu:
            self.key_chunks, self.value_chunks = [], []
        causal = torch.ones((P, P), dtype=torch.bool, device=self.device).tril()
        # A padding query attends to itself alone: a row with no key would give NaN keys to later layers.
        mask = (self.key_mask[:, None, None, :P] & causal) | torch.eye(P, dtype=torch.bool, device=self.device)  # (B, 1, P, P)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.gpu):
            logits = self._blocks(self._embed(input_ids, position_ids), torch.arange(P, device=self.device), mask)
        self.slot.fill_(P)
        self.position.copy_(position_ids[:, -1] + 1)
        return logits[:, -1].float()

    def _step(self) -> torch.Tensor:
        """One token per row at slot ``self.slot``; advances slot and positions. No host synchronisation
        on a GPU (all L slots attended, the unwritten ones masked); on a CPU only the chunks written."""
        self.key_mask.index_fill_(1, self.slot, True)
        span = self.length if self.gpu else int(self.slot) + 1  # on a CPU, reading the slot costs no sync
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.gpu):
            logits = self._blocks(self._embed(self.token[:, None], self.position[:, None]), self.slot,
                                  self.key_mask[:, None, None, :span])  # (B, 1, V)
        self.slot += 1
        self.position += 1
        return logits[:, 0].float()

    def keep(self, rows: torch.Tensor) -> None:
        """Keeps only ``rows`` (indices into the current batch) for the next steps: the CPU path's way of
        dropping finished rows. Copies the kept rows' written slots once; not for a captured graph."""
        if self.graph not in (None, False):
            raise RuntimeError("a decoder with a captured CUDA graph keeps its batch")
        self.key_chunks = [chunk.index_select(1, rows) for chunk in self.key_chunks]
        self.value_chunks = [chunk.index_select(1, rows) for chunk in self.value_chunks]
        self.key_mask, self.token, self.position = self.key_mask[rows], self.token[rows], self.position[rows]
        self.batch = len(rows)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feeds ``token`` (B,) and returns the next logits (B, V); on CUDA a replay of the graph
        captured at the first call (the logits are then the graph's output buffer, valid until the
        next step)."""
        self.token.copy_(token)
        if not self.gpu or self.graph is False:
            return self._step()
        if self.graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the capture (lazy cuBLAS handles, autocast)
                saved = (self.key_mask.clone(), self.slot.clone(), self.position.clone())
                self._step()
                self.key_mask.copy_(saved[0]), self.slot.copy_(saved[1]), self.position.copy_(saved[2])
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph):  # records the step's kernels without running them
                    self.logits = self._step()
            except RuntimeError as e:  # a capture this torch or GPU refuses: the same step, eager
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0]}); decoding without graphs")
                self.graph = False
                return self._step()
        self.graph.replay()
        return self.logits


def _additive_bias(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A boolean attention mask (B, 1, T, S) as the additive bias (B, 1, T, width) of the softmax:
    0 where attended, -inf where masked and on the slots S..width-1 that the mask does not cover."""
    B, _, T, S = mask.shape
    bias = torch.full((B, 1, T, width), float("-inf"), device=mask.device)
    bias[..., :S].masked_fill_(mask, 0.0)
    return bias


def decoder_for(model, batch: int, length: int) -> StaticDecoder:
    """The model's decoder of this (batch, length), made once and kept on the model (at most two
    shapes: a run's rollouts and its evaluations), so a graph is captured once per shape."""
    kept = model.__dict__.setdefault("_static_decoders", {})
    key = (batch, length)
    if key not in kept:
        while len(kept) >= 2:
            kept.pop(next(iter(kept)))
        kept[key] = StaticDecoder(model, batch, length)
    return kept[key]
