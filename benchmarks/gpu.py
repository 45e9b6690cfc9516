"""The GPU path, measured on one GPU in one process (issue 11): pre-training, decoding and RL.

Parts, each printed and saved to ``--out`` (JSON) as soon as it is measured, skipped once
``--deadline-s`` has passed (the GPU is lent for minutes at a time):

1. bf16 matmul ceiling: the best (n, n) @ (n, n) at n = 4096 and 8192, beside the datasheet's
   dense bf16 peak for the GPUs we are lent (H100 SXM 989 TFLOP/s, H100 PCIe 756, H200 989).
2. pre-training of the ``--preset`` model on N = 7 batches (the package's `encode_examples`,
   `epoch_batches`, `collate` with widths padded to multiples of 64), the step of
   critical_tokens.pretrain on a GPU (bf16 autocast, fused AdamW, gradient clipping): eager and
   ``torch.compile(dynamic=True)`` side by side, for each batch size; tokens/s after warm-up, the
   warm-up (the first steps, compilation included), and MFU = model FLOP/s (6 N + 6 L T d per token,
   common.py) over the datasheet peak and over the measured matmul ceiling.
3. decoding: the package's `generate` as it runs on this device ("auto": on a GPU the static-shape
   decoder, one CUDA-graph replay per token; static_decode.py), the same with ``model(...)`` calls
   over the pre-allocated cache ("hf"), and transformers' `model.generate`, on the same prompts and
   model, ``--decode-tokens`` tokens per row (no stop token), at each ``--decode-batches``: tokens/s,
   and the ratio of ours ("auto") to transformers' generate.
4. RL: `critical-tokens rl` itself (its defaults, collects of ``--rl-batch`` episodes) on the
   random-weight model of benchmarks/rl.py whose episodes all run to the length limit (725 tokens),
   episodes/min over the timed iterations (the first, warm-up, excluded) with the time split; then,
   if trl and datasets import (carried as wheels to the GPU machine), TRL's GRPOTrainer on the same
   model with completions of the same length, ``--rl-batch`` per step, and the ratio.

    python benchmarks/gpu.py --out results.json                  # on the GPU: about 3 minutes
    python benchmarks/gpu.py --preset micro --quick --out x.json # the same code on a CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from critical_tokens import addition
from critical_tokens.generation import addition_stop_rule, generate, left_pad
from critical_tokens.model import build_model
from critical_tokens.pretrain import collate, encode_examples, epoch_batches
from critical_tokens.tokenizer import build_tokenizer, encode

from common import forward_flops_per_token, machine_header

N_DIGITS = 7
DATASHEET_BF16_DENSE = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}  # TFLOP/s without sparsity


def datasheet_peak(name: str) -> float | None:
    for key, value in DATASHEET_BF16_DENSE.items():
        if key in name:
            return value
    return None


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(device, sizes, seconds: float) -> float:
    """Best bf16 matmul FLOP/s over ``sizes`` (float32 on a CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        synchronize(device)
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            for _ in range(10):
                a @ b
            synchronize(device)
            best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def pretraining(preset: str, device, batch_size: int, compiled: bool, steps: int, warmup: int) -> dict:
    """Tokens/s of the GPU pre-training step after ``warmup`` steps, the warm-up's wall time, MFU terms."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(preset, tokenizer, N_DIGITS).to(device).train()
    gpu = device.type == "cuda"
    step_model = torch.compile(model, dynamic=True) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), **({"fused": True} if gpu else {}))
    n_batches = warmup + steps
    examples = encode_examples(tokenizer, addition.pretraining_pairs(N_DIGITS, n_batches * batch_size // N_DIGITS + 1, seed=0))
    lengths = [len(seq) for seq, _ in examples]
    order = epoch_batches(len(examples), lengths, batch_size, seed=0, epoch=0)[:n_batches]
    batches = [collate(examples, idx, tokenizer.pad_token_id, "completion", 0, torch.Generator(), pad_multiple=64) for idx in order]

    def step(batch):
        ids, mask, labels, position_ids = (t.to(device, non_blocking=True) for t in batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = step_model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    t0 = time.perf_counter()
    for batch in batches[:warmup]:
        step(batch)
    synchronize(device)
    t1 = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - t1
    timed = batches[warmup:]
    tokens = sum(int(b[1].sum()) for b in timed)
    flops = sum(3 * forward_flops_per_token(model, b[0].shape[1]) * int(b[1].sum()) for b in timed)
    return {"preset": preset, "batch_size": batch_size, "compiled": compiled, "warmup_steps": warmup, "warmup_s": t1 - t0,
            "steps": steps, "tokens_per_s": tokens / seconds, "model_flops_per_s": flops / seconds,
            "padded_tokens_share": 1 - tokens / sum(b[0].numel() for b in timed)}


def decoding(preset: str, device, batch: int, new_tokens: int, rounds: int) -> dict:
    """Tokens/s of ours and of transformers' generate, interleaved in ``rounds``."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(preset, tokenizer, N_DIGITS).to(device).eval()
    pairs = addition.rl_pairs(N_DIGITS, 1, batch, seed=0)
    prompts = [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs]
    rule = {**addition_stop_rule(tokenizer), "eos_token_id": -1, "stop_token_id": None, "stop_after": ()}  # never stops
    ours, theirs = [], []
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)  # (B, P), as generate pads them
    width = ids.shape[1]

    def hf_generate():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)

    plain = []
    for decoder in ("auto", "hf"):  # warm-up of every path (on a GPU "auto" captures its graph here)
        generate(model, prompts, max_new_tokens=4, decoder=decoder, **rule)
    hf_generate()
    for _ in range(rounds):
        for decoder, rates in (("auto", ours), ("hf", plain)):
            synchronize(device)
            t0 = time.perf_counter()
            out = generate(model, prompts, max_new_tokens=new_tokens, decoder=decoder, **rule)
            synchronize(device)
            rates.append(out.completion_mask.sum().item() / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        hf = hf_generate()
        synchronize(device)
        theirs.append((hf.shape[1] - width) * batch / (time.perf_counter() - t0))
    return {"preset": preset, "batch": batch, "new_tokens": new_tokens, "ours_tokens_per_s": statistics.median(ours),
            "ours_model_call_path_tokens_per_s": statistics.median(plain),
            "hf_generate_tokens_per_s": statistics.median(theirs), "ratio": statistics.median(o / t for o, t in zip(ours, theirs))}


def rl_throughput(preset: str, device, batch: int, iterations: int, workdir: Path, trl_steps: int) -> dict:
    """Episodes/min of `critical-tokens rl` (its defaults: A2C, standard KL) and, if it can be imported,
    of TRL's GRPOTrainer, on the same model whose episodes all run to the length limit (rl.py)."""
    from critical_tokens.rl.loop import train
    from critical_tokens.rl.config import RLConfig
    from critical_tokens.runs import read_metrics
    from rl import save_pretrained_run, run_trl, trl_available

    pretrained = save_pretrained_run(workdir, preset)
    run = workdir / "ours"
    train(RLConfig(pretrained=str(pretrained), out=str(run), episodes=batch * iterations, batch_size=batch,
                   minibatch_size=min(batch, 64), eval_every=10**9, eval_episodes=1, eval_comfort_episodes=1, probe_examples=1,
                   final_eval_episodes=1, final_eval_comfort_episodes=1, final_probe_examples=1))
    lines = [r for r in read_metrics(run) if "iteration" in r]
    parts = ("rollout", "reference", "update")
    timed = sum(lines[-1][f"time/{k}"] - lines[0][f"time/{k}"] for k in parts)  # the first iteration (warm-up) excluded
    result = {"preset": preset, "batch": batch, "timed_iterations": len(lines) - 1,
              "episodes_per_min": 60 * batch * (len(lines) - 1) / timed, "episode_length": lines[-1]["episode_length"],
              "time_split_s": {k: lines[-1][f"time/{k}"] - lines[0][f"time/{k}"] for k in parts}, "trl": trl_available()}
    if result["trl"] and trl_steps:
        length = int(result["episode_length"])
        try:
            trl = run_trl(pretrained, workdir / "trl", length, batch, 8, trl_steps, 0.04, gpu=device.type == "cuda")
            result.update(trl_episodes_per_min=trl["episodes_per_min"], trl_completion_length=length,
                          ratio_to_trl=result["episodes_per_min"] / trl["episodes_per_min"])
        except Exception as e:  # noqa: BLE001 - TRL's version there may not fit; say so and keep the rest
            result["trl_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-benchmark.json", help="JSON file of the results, rewritten after every part")
    parser.add_argument("--preset", default="paper", help="model size (paper: the 85M GPT-2)")
    parser.add_argument("--quick", action="store_true", help="a few steps and tokens per part (a CPU check of the script)")
    parser.add_argument("--deadline-s", type=float, default=240, help="parts not started by then are skipped")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256], help="pre-training batch sizes")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[256, 1024], help="decoding batch sizes")
    parser.add_argument("--decode-tokens", type=int, default=256, help="generated tokens per row")
    parser.add_argument("--compiled-only", action="store_true", help="pre-training: the compiled step alone (eager measured before)")
    parser.add_argument("--rl-batch", type=int, default=128, help="RL episodes per collect (and TRL completions per step)")
    parser.add_argument("--trl-steps", type=int, default=2, help="TRL GRPOTrainer steps, the first not timed (0: no TRL)")
    args = parser.parse_args()
    t_start = time.perf_counter()
    machine_header("the GPU path: pre-training, decoding, RL")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    results: dict = {"device": name, "torch": torch.__version__, "parts": {}}
    quick = args.quick

    def save(part: str, value) -> None:
        results["parts"].setdefault(part, []).append(value)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.out)
        print(f"{part}: {json.dumps(value)}", flush=True)

    def in_time() -> bool:
        left = args.deadline_s - (time.perf_counter() - t_start)
        if left <= 0:
            print("deadline reached: the remaining parts are skipped", flush=True)
        return left > 0

    ceiling = matmul_ceiling(device, (256,) if quick else (4096, 8192), 0.2 if quick else 1.0)
    peak = datasheet_peak(name)
    save("matmul", {"measured_flops_per_s": ceiling, "datasheet_bf16_dense": peak})

    def pretrain_part(batch_size: int, compiled: bool) -> None:
        r = pretraining(args.preset, device, batch_size, compiled, steps=2 if quick else 20, warmup=1 if quick else 5)
        r["mfu_datasheet"] = r["model_flops_per_s"] / peak if peak else None
        r["mfu_measured_ceiling"] = r["model_flops_per_s"] / ceiling
        save("pretrain", r)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def decode_part(batch: int) -> None:
        save("decode", decoding(args.preset, device, batch, 8 if quick else args.decode_tokens, 1 if quick else 2))

    def rl_part() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            save("rl", rl_throughput(args.preset, device, args.rl_batch, 2 if quick else 3, Path(tmp), args.trl_steps))

    # The parts in the order of what the GPU session needs most; each starts only before the deadline.
    compile_too = device.type == "cuda" or not quick
    parts = [lambda b=b: pretrain_part(b, False) for b in args.batch_sizes if not args.compiled_only] + [rl_part]
    parts += [lambda: decode_part(args.decode_batches[0])]
    parts += [lambda b=b: pretrain_part(b, True) for b in args.batch_sizes if compile_too]
    parts += [lambda b=b: decode_part(b) for b in args.decode_batches[1:]]
    for part in parts:
        if not in_time():
            break
        part()
    print(f"done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
