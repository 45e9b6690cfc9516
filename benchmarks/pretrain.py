"""Pre-training throughput and model FLOPs utilisation (issue 2, "Performance").

Measures, interleaved in rounds so that both see the same machine load:
  - the machine's float32 matmul throughput (best (n, n) @ (n, n) at n = 1024 and 2048, 2 n^3 FLOPs);
  - pre-training tokens/s of the real training step of critical_tokens.pretrain (forward with the
    completion loss, backward, gradient clipping, AdamW) on batches of N = 7 data built by the
    package's `encode_examples`, `epoch_batches` and `collate`, for the `tiny` and `small` presets.

Model FLOPs per token (Kaplan et al. 2020, Table 1; the PaLM appendix B convention without its
non-causal attention doubling):
    6 * N + 6 * n_layer * T * d_model
N = non-embedding parameters, T = the batch's (padded) sequence length, d_model = n_embd; counted
over the real (non-padding) tokens only, as the package's progress bar counts tokens/s.
MFU = achieved model FLOP/s / measured matmul FLOP/s of the same round.

    .venv/bin/python benchmarks/pretrain.py            # a few minutes on 2 cores
    .venv/bin/python benchmarks/pretrain.py --quick    # ~30 s (batch 16, one round)
"""

from __future__ import annotations

import argparse
import time

import torch

from critical_tokens import addition
from critical_tokens.model import build_model
from critical_tokens.pretrain import PretrainConfig, collate, encode_examples, epoch_batches
from critical_tokens.tokenizer import build_tokenizer

from common import add_thread_argument, fmt_rate, machine_header, median, non_embedding_parameters, peak_matmul_flops_per_s

N_DIGITS = 7


def train_step(model, optimizer, batch, grad_clip: float) -> None:
    """critical_tokens.pretrain._train_step (step 3) on one process and the CPU (no autocast)."""
    ids, mask, labels, position_ids = batch
    loss = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def bench(preset: str, batch_size: int, rounds: int, steps_per_round: int, warmup: int, matmul_seconds: float) -> dict:
    cfg = PretrainConfig(preset=preset, n_digits=N_DIGITS, batch_size=batch_size)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(preset, tokenizer, N_DIGITS).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    n_batches = warmup + rounds * steps_per_round
    examples = encode_examples(tokenizer, addition.pretraining_pairs(N_DIGITS, max(50, n_batches * batch_size // N_DIGITS + 1), seed=0))
    lengths = [len(seq) for seq, _ in examples]
    order = epoch_batches(len(examples), lengths, batch_size, seed=0, epoch=0)[:n_batches]
    batches = [collate(examples, idx, tokenizer.pad_token_id, cfg.loss_on, 0, torch.Generator()) for idx in order]
    n = non_embedding_parameters(model)
    c = model.config

    def model_flops(batch) -> float:
        ids, mask = batch[0], batch[1]
        return int(mask.sum()) * (6 * n + 6 * c.n_layer * ids.shape[1] * c.n_embd)

    real = sum(int(b[1].sum()) for b in batches)
    padded = sum(b[0].numel() for b in batches)
    print(f"\n-- {preset}: N = {n / 1e6:.2f}M non-embedding parameters, n_layer {c.n_layer}, d_model {c.n_embd}; batch {batch_size} "
          f"of N = {N_DIGITS} data, mean padded length {padded / len(batches) / batch_size:.0f}, padding {100 * (1 - real / padded):.0f}% "
          f"of the positions; {warmup} warm-up steps, then {rounds} rounds of {steps_per_round} steps")
    for b in batches[:warmup]:
        train_step(model, optimizer, b, cfg.grad_clip)
    rows = []
    for r in range(rounds):
        peak = max(peak_matmul_flops_per_s(matmul_seconds).values())
        chunk = batches[warmup + r * steps_per_round : warmup + (r + 1) * steps_per_round]
        t0 = time.perf_counter()
        for b in chunk:
            train_step(model, optimizer, b, cfg.grad_clip)
        dt = time.perf_counter() - t0
        tokens_per_s = sum(int(b[1].sum()) for b in chunk) / dt
        flops_per_s = sum(model_flops(b) for b in chunk) / dt
        rows.append((tokens_per_s, flops_per_s, peak, flops_per_s / peak, dt / len(chunk)))
        print(f"round {r + 1}: {fmt_rate(tokens_per_s)} tokens/s, {flops_per_s / 1e9:.1f} GFLOP/s of model FLOPs, "
              f"matmul {peak / 1e9:.1f} GFLOP/s, MFU {100 * flops_per_s / peak:.1f}%  ({dt / len(chunk):.2f} s/step)")
    result = {k: median([row[i] for row in rows]) for i, k in enumerate(("tokens_per_s", "flops_per_s", "peak", "mfu", "step_seconds"))}
    print(f"{preset}: {fmt_rate(result['tokens_per_s'])} tokens/s, {result['flops_per_s'] / 1e9:.1f} GFLOP/s, "
          f"MFU {100 * result['mfu']:.1f}% of the measured matmul {result['peak'] / 1e9:.1f} GFLOP/s (medians of {rounds} rounds)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, one round of 3 steps per preset (~30 s)")
    parser.add_argument("--presets", default="tiny,small", help="comma-separated presets")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 64 as pre-training, --quick 16)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved matmul / training rounds (default 3, --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per round (default 6 tiny / 3 small, --quick 3)")
    add_thread_argument(parser)
    args = parser.parse_args()
    machine_header("benchmarks/pretrain.py: pre-training tokens/s and MFU against the measured float32 matmul", args.threads)
    t0 = time.perf_counter()
    peaks = peak_matmul_flops_per_s(2.0)
    print("float32 matmul: " + ", ".join(f"{n}x{n} {f / 1e9:.1f} GFLOP/s" for n, f in peaks.items()) + " (best of 2 s each)")
    print("model FLOPs per token = 6 * N_non_embedding + 6 * n_layer * T * d_model (Kaplan et al. 2020, Table 1), real tokens only")
    results = {}
    batch_size = args.batch_size or (16 if args.quick else 64)
    for preset in args.presets.split(","):
        steps = args.steps or (3 if args.quick else {"tiny": 6}.get(preset, 3))
        results[preset] = bench(preset, batch_size, args.rounds or (1 if args.quick else 3),
                                steps, warmup=1, matmul_seconds=0.5 if args.quick else 1.0)
    # The package's loop recomputes the epoch's batch order (shuffle + sort by length) at every step:
    # time that on a data set of the default size for N = 7 (lengths do not matter for the cost).
    n_default = PretrainConfig().examples_per_length * N_DIGITS
    fake_lengths = torch.randint(50, 600, (n_default,)).tolist()
    t1 = time.perf_counter()
    epoch_batches(n_default, fake_lengths, 64, seed=0, epoch=0)
    order_seconds = time.perf_counter() - t1
    print(f"\nnot in the steps above: pretrain() calls epoch_batches() at every step; on the default N = {N_DIGITS} data set "
          f"({n_default:,} examples) one call takes {1e3 * order_seconds:.0f} ms = "
          + ", ".join(f"{100 * order_seconds / (r['step_seconds'] + order_seconds):.0f}% of a {p} step of batch {batch_size}" for p, r in results.items()))
    print("\nsummary: " + "; ".join(f"{p} {fmt_rate(r['tokens_per_s'])} tok/s, {r['flops_per_s'] / 1e9:.1f} GFLOP/s, MFU {100 * r['mfu']:.1f}%"
                                    for p, r in results.items()))
    if "small" in results:
        mfu = results["small"]["mfu"]
        print(f"target (issue 2): MFU >= 40% for small: {100 * mfu:.1f}%, {'met' if mfu >= 0.4 else 'NOT met'}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
