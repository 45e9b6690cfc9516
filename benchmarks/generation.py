"""Batched KV-cache generation against the paper's design (issue 2, "Performance").

Three ways of generating the same number of tokens from the same model and the same N = 7 prompts:

    ours          critical_tokens.generation.generate: one batch, KV cache, one token per row per call
    paper design  batch 2, no cache: the whole prefix goes through the model again for every token
    HF generate   transformers' model.generate (greedy, use_cache=True), same batch as ours: context

All generate a fixed number of tokens (no stop rule: random weights would otherwise stop anywhere),
greedily, and are timed in interleaved rounds; the script prints tokens/s of each and the ratios per
round and their median. `tiny` runs the whole completion length of N = 7
(addition.max_completion_length(7)); `paper` (85M) only a few tokens on a CPU, which understates the
paper design's cost, since its per-token cost grows with the prefix.

    .venv/bin/python benchmarks/generation.py            # a few minutes on 2 cores
    .venv/bin/python benchmarks/generation.py --quick    # ~30 s
"""

from __future__ import annotations

import argparse
import time

import torch

from critical_tokens import addition
from critical_tokens.generation import generate
from critical_tokens.model import build_model, count_parameters
from critical_tokens.tokenizer import build_tokenizer, encode

from common import add_thread_argument, fmt_rate, machine_header, median

N_DIGITS = 7
NEVER = -1  # an end-of-text id no token can equal: every row runs to max_new_tokens


@torch.no_grad()
def paper_design(model, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """The paper's loop: batch 2, the whole prefix re-run through the model for every new token."""
    ids = torch.tensor(prompts)  # (2, P), same-length prompts: no padding needed
    for _ in range(new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]  # (2, V)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)  # (2, P + t + 1)
    return ids


def ours(model, prompts, new_tokens, pad_id) -> torch.Tensor:
    gen = generate(model, prompts, max_new_tokens=new_tokens, eos_token_id=NEVER, pad_token_id=pad_id, temperature=0.0)
    assert gen.completion_mask.all() and gen.completion_mask.shape[1] == new_tokens
    return gen.sequences


@torch.no_grad()
def hf_generate(model, prompts, new_tokens, pad_id) -> torch.Tensor:
    ids = torch.tensor(prompts)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad_id)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return out


def timed_tokens_per_s(fn, n_tokens: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n_tokens / (time.perf_counter() - t0)


def bench(preset: str, batch: int, new_tokens: int, rounds: int) -> dict:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(preset, tokenizer, N_DIGITS).eval()  # random weights: the cost does not depend on them
    pairs = addition.eval_pairs(N_DIGITS, "identical", batch, seed=0)  # all prompts have the same length
    prompts = [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs]
    pad = tokenizer.pad_token_id
    print(f"\n-- {preset}: {count_parameters(model) / 1e6:.2f}M parameters, prompts of {len(prompts[0])} tokens (N = {N_DIGITS}), "
          f"{new_tokens} generated tokens per row; ours and HF generate batch {batch}, paper design batch 2")
    sides = {
        "ours": (lambda: ours(model, prompts, new_tokens, pad), batch * new_tokens),
        "paper design": (lambda: paper_design(model, prompts[:2], new_tokens), 2 * new_tokens),
        "HF generate": (lambda: hf_generate(model, prompts, new_tokens, pad), batch * new_tokens),
    }
    # Warm-up: the first full-size generation in a process runs up to 2x slower (the allocator is
    # still growing the heap for the KV cache), so one untimed call at full size, then rounds in
    # rotating order.
    ours(model, prompts, new_tokens, pad), paper_design(model, prompts[:2], 2), hf_generate(model, prompts[:2], 2, pad)
    rates = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            fn, n = sides[name]
            rates[name].append(timed_tokens_per_s(fn, n))
        print(f"round {r + 1}: " + ", ".join(f"{name} {fmt_rate(rates[name][-1])} tok/s" for name in sides)
              + f"; ours / paper design {rates['ours'][-1] / rates['paper design'][-1]:.1f}x, ours / HF {rates['ours'][-1] / rates['HF generate'][-1]:.2f}x")
    ratio_paper = median([o / p for o, p in zip(rates["ours"], rates["paper design"])])
    ratio_hf = median([o / h for o, h in zip(rates["ours"], rates["HF generate"])])
    print(f"{preset}: median tokens/s: ours {fmt_rate(median(rates['ours']))}, paper design {fmt_rate(median(rates['paper design']))}, "
          f"HF generate {fmt_rate(median(rates['HF generate']))}")
    print(f"{preset}: ours / paper design = {ratio_paper:.1f}x (median of {rounds} rounds); ours / HF generate = {ratio_hf:.2f}x")
    return {"ratio_paper": ratio_paper, "ratio_hf": ratio_hf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, batch 32 at tiny, 16 rows x 8 tokens at paper (~30 s)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per preset (default 3, --quick 1)")
    parser.add_argument("--tiny-batch", type=int, default=None, help="batch of ours and HF generate at tiny (default 64, --quick 32)")
    parser.add_argument("--paper-batch", type=int, default=None, help="batch of ours and HF generate at paper (default 64, --quick 16)")
    parser.add_argument("--paper-tokens", type=int, default=None, help="generated tokens per row at paper (default 16, --quick 8)")
    parser.add_argument("--skip-paper", action="store_true", help="tiny only")
    add_thread_argument(parser)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    machine_header("benchmarks/generation.py: KV-cache batched generation vs the paper's no-cache batch-2 loop", args.threads)
    paper_tokens = args.paper_tokens or (8 if args.quick else 16)
    tiny = bench("tiny", args.tiny_batch or (32 if args.quick else 64), addition.max_completion_length(N_DIGITS), rounds)
    target = "met" if tiny["ratio_paper"] >= 30 else "NOT met"
    print(f"target (issue 2): >= 30x at tiny over the completion length of N = {N_DIGITS}: {tiny['ratio_paper']:.1f}x, {target}")
    if not args.skip_paper:
        bench("paper", args.paper_batch or (16 if args.quick else 64), paper_tokens, rounds)
        print(f"note: at paper only the first {paper_tokens} tokens are generated (short prefixes), so the paper design's "
              "per-token cost, which grows with the prefix, is understated there")


if __name__ == "__main__":
    main()
