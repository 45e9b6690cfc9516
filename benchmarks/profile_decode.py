"""Where a decoding step's time goes (issue 12, "profile first").

For each batch size, a random-weight `tiny` GPT-2 samples (T = 1) a full-length completion of the RL
task of the cpu presets (4-digit additions from N = 3) with `critical_tokens.generation.generate`,
under torch.profiler. The script prints ms per decoding step, the per-op table (self CPU time), and
for the attention kernel a floor: the bytes of keys and values it must read at every step (the whole
KV cache of every layer) at the memory read bandwidth measured in the same run. The gap between the
kernel's time and that floor is what a better single-query attention kernel could win.

    .venv/bin/python benchmarks/profile_decode.py --threads 1             # a few minutes
    .venv/bin/python benchmarks/profile_decode.py --threads 1 --quick     # batch 64, 100 tokens
    .venv/bin/python benchmarks/profile_decode.py --threads 1 --layouts   # the cache layouts' attention alone

``--layouts`` times one decoding step's attention (4 layers of `tiny`'s 4 heads of 32, one query per
row, softmax(q k^T / sqrt(D) + mask) v with batched products) over the first ``span`` slots of a
(B, H, L, D) cache of L = 512 slots, the static decoder's layout before issue 36, against the same over
contiguous chunks of 64 slots (`static_decode.CHUNK`; the decoder's own code), the layout it has now, side by side.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from critical_tokens import addition
from critical_tokens.generation import generate
from critical_tokens.model import build_model
from critical_tokens.static_decode import CHUNK, StaticDecoder
from critical_tokens.tokenizer import build_tokenizer, encode

from common import add_thread_argument, machine_header

N_DIGITS = 3
NEVER = -1  # an end-of-text id no token can equal: every row runs to max_new_tokens
# The attention's kernels: the static decoder's chunked attention on a CPU (its only batched products
# and softmax), and torch's fused kernel where a model(...) call or an older decoder uses it.
ATTENTION = {"aten::bmm", "aten::baddbmm_", "aten::_softmax", "aten::_scaled_dot_product_flash_attention_for_cpu"}


def read_bandwidth(megabytes: int = 64, seconds: float = 1.0) -> float:
    """Best bytes/s of summing a float32 tensor of `megabytes` (larger than the caches)."""
    x = torch.randn(megabytes * 2**20 // 4)
    x.sum()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def kv_bytes_read(model, batch: int, prompt_length: int, new_tokens: int) -> float:
    """Bytes of keys and values the attention reads over a generation: at step t every layer reads
    its whole cache of prompt_length + t + 1 positions, keys and values, float32."""
    c = model.config
    positions = sum(prompt_length + t + 1 for t in range(1, new_tokens))  # the prompt's pass not counted
    return 2 * c.n_layer * batch * c.n_embd * 4 * positions


def attention_layouts(batch: int = 200, spans=(100, 200, 300), length: int = 512, repeats: int = 10) -> None:
    """Prints ms per step of the attention over a (B, H, L, D) cache's first span slots and over
    contiguous chunks of CHUNK slots (the static decoder's own `_attend_chunks`, on `tiny`'s shape), and
    their ratio; the caches of every layer, so that no layer's keys stay in the CPU's caches from one
    layer to the next."""
    model = build_model("tiny", build_tokenizer(), N_DIGITS).eval()
    layers, heads = model.config.n_layer, model.config.n_head
    dim = model.config.n_embd // heads
    print(f"\nattention of one decoding step, batch {batch}, {layers} layers of {heads} heads x {dim}, one query per row:")
    for span in spans:
        chunks = -(-span // CHUNK)
        q = torch.randn(batch, heads, 1, dim)
        bias = torch.zeros(batch, 1, 1, chunks * CHUNK)
        bias[..., :3] = float("-inf")  # left padding
        bias[..., span:] = float("-inf")  # slots not yet written
        whole = [[torch.randn(batch, heads, length, dim) for _ in range(2)] for _ in range(layers)]
        decoder = StaticDecoder(model, batch, chunks * CHUNK)
        decoder.key_chunks = [torch.randn(layers, batch, heads, CHUNK, dim) for _ in range(chunks)]
        decoder.value_chunks = [torch.randn(layers, batch, heads, CHUNK, dim) for _ in range(chunks)]

        def over_whole():
            for keys, values in whole:
                k = keys[:, :, :span].reshape(batch * heads, span, dim)  # blocks L * D apart
                v = values[:, :, :span].reshape(batch * heads, span, dim)
                scaled = (q * dim**-0.5).reshape(batch * heads, 1, dim)
                scores = (torch.bmm(scaled, k.transpose(1, 2)).view(batch, heads, 1, span) + bias[..., :span]).softmax(-1)
                torch.bmm(scores.view(batch * heads, 1, span), v)

        def over_chunks():
            for layer in range(layers):
                decoder._attend_chunks(layer, q, bias)

        times = {f: [] for f in (over_whole, over_chunks)}
        for _ in range(repeats):  # alternating
            for f in times:
                start = time.perf_counter()
                f()
                times[f].append(time.perf_counter() - start)
        a, b = (1e3 * sorted(t)[len(t) // 2] for t in times.values())
        print(f"  span {span}: (B, H, {length}, D) cache {a:.2f} ms, chunks of {CHUNK} {b:.2f} ms: {a / b:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="batch sizes")
    parser.add_argument("--quick", action="store_true", help="batch 64 only, 100 tokens")
    parser.add_argument("--ops", type=int, default=10, help="rows of each profiler table")
    parser.add_argument("--layouts", action="store_true", help="only the attention over the two cache layouts, side by side")
    add_thread_argument(parser)
    args = parser.parse_args()
    machine_header("where a decoding step's time goes", args.threads)
    if args.layouts:
        attention_layouts()
        return

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model("tiny", tokenizer, N_DIGITS).eval()
    new_tokens = 100 if args.quick else addition.max_completion_length(N_DIGITS + 1)
    batches = [64] if args.quick else args.batches
    bandwidth = read_bandwidth()
    print(f"model: tiny, {sum(p.numel() for p in model.parameters()):,} parameters; {new_tokens} tokens per generation, "
          f"sampled at T = 1; memory read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for batch in batches:
        pairs = addition.rl_pairs(N_DIGITS, 1, batch, seed=batch)
        prompts = [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs]
        kwargs = dict(max_new_tokens=new_tokens, eos_token_id=NEVER, pad_token_id=tokenizer.pad_token_id, temperature=1.0)
        generate(model, prompts[:2], **{**kwargs, "max_new_tokens": 4})  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
            seconds = time.perf_counter() - start
        ops = prof.key_averages()
        total = sum(op.self_cpu_time_total for op in ops)
        attention = sum(op.self_cpu_time_total for op in ops if op.key in ATTENTION)
        floor = kv_bytes_read(model, batch, max(len(p) for p in prompts), new_tokens) / bandwidth
        print(f"\nbatch {batch}: {1e3 * seconds / new_tokens:.2f} ms per decoding step (under the profiler); "
              f"the attention's kernels {100 * attention / total:.0f}% of the ops' time, "
              f"{1e3 * attention / 1e6 / new_tokens:.2f} ms/step against a floor of {1e3 * floor / new_tokens:.2f} ms/step "
              f"for reading the KV cache ({attention / 1e6 / floor:.1f}x the floor)")
        print(ops.table(sort_by="self_cpu_time_total", row_limit=args.ops))


if __name__ == "__main__":
    main()
