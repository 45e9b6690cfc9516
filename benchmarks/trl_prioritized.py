"""The cost of the prioritized KL penalty in TRL: seconds per GRPO step, PrioritizedGRPOTrainer vs GRPOTrainer.

Both trainers get the same random-weight model (`tiny` by default), the same prompts (all of the same
length, so no padding), the same forced completion length (min_new_tokens = max_completion_length: every
step does the same work whatever the weights), beta 0.04, and the same TRL options. They run interleaved in
rounds, in alternating order; in each round each trainer runs `--steps` optimizer steps and the first one
(warm-up) is not timed. The ratio prioritized / plain of the median step time is printed per round, then
its median: the machines are shared, so only ratios measured side by side mean anything.

The step ratio carries the noise of generation, which is most of a step and the same on both sides. So
the parts that differ are also timed alone, on one shared batch, alternating `--repeats` times: the
reference pass (ours: full logits, log-probs and certainty; TRL's: its fused log-prob head) and the loss
with its backward (ours adds beta * (w * k - k3) to TRL's). Their extra time is printed as a share of
plain TRL's step.

    .venv/bin/python benchmarks/trl_prioritized.py               # about 2-3 minutes on 2 cores
    .venv/bin/python benchmarks/trl_prioritized.py --quick       # 1 round, shorter completions

Target (issue 13): a step with the prioritized KL within 5% of plain TRL's.

`--qwen2`: a real vocabulary. A random-weight model of Qwen2's shape (Qwen2ForCausalLM, V = 151,936, tied
embeddings, a small hidden size; built here from a Qwen2Config, nothing downloaded) and a word-level
tokenizer with one word per id, 8 completions of 256 and of 512 forced tokens per step. Each side runs in a
process of its own (this script with `--child`), so that its peak resident memory (ru_maxrss) is its own;
the processes alternate in order over the rounds. The weighted side runs each rule of `--rules` (the text of
critical_tokens/kl_rules.py; default: every built-in, and a product) as a process of its own. Prints per length
and rule the step-time ratio and the peak-memory ratio, rule / plain. Targets: step time at most +5%, peak
memory at most +10%.

    .venv/bin/python benchmarks/trl_prioritized.py --qwen2 --threads 1 --rules prioritized:150   # about 25 minutes on 2 loaded cores
    .venv/bin/python benchmarks/trl_prioritized.py --qwen2 --threads 1                           # every built-in: about 90 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from critical_tokens import addition, kl
from critical_tokens.model import build_model, load_pretrained
from critical_tokens.tokenizer import build_tokenizer
from critical_tokens.trl import PrioritizedGRPOConfig, PrioritizedGRPOTrainer

from common import add_thread_argument, machine_header, median

N_DIGITS = 7
SIDES = {"plain": (GRPOTrainer, GRPOConfig, {}),
         "prioritized": (PrioritizedGRPOTrainer, PrioritizedGRPOConfig, {"prioritized_beta": 150.0})}
# --qwen2's rules: each built-in of kl_rules, and a product ("<eos>": the word-level tokenizer's end of text)
BUILT_IN_RULES = ["prioritized:150", "prioritized:auto", "uniform:1", "ignore:<eos>", "entropy_quantile:0.2", "prioritized:150*ignore:<eos>"]


def side(name: str):
    """(trainer class, config class, options) of a side: "plain" (TRL's), "prioritized", or a rule's text."""
    return SIDES.get(name) or (PrioritizedGRPOTrainer, PrioritizedGRPOConfig, {"kl_weights": name})


def save_random_model(root: Path, preset: str) -> Path:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(preset, tokenizer, N_DIGITS)
    model.config.critical_tokens_n_digits = N_DIGITS
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def step_seconds(trainer_class, config_class, pretrained: Path, out: Path, args, loaded=None, cpu: list | None = None, **options) -> list[float]:
    """Seconds of each optimizer step after the first, from a fresh trainer's train(). ``loaded``: the
    (model, tokenizer, dataset) to train on, if not the addition model saved at ``pretrained``;
    ``cpu``: a list that receives each of those steps' CPU seconds of this process (all its threads),
    which other jobs on the machine disturb far less than the wall time."""
    if loaded is None:
        model, tokenizer, _ = load_pretrained(pretrained)
        prompts_per_step = args.completions // args.num_generations
        pairs = addition.eval_pairs(N_DIGITS + 1, "identical", prompts_per_step * args.steps, seed=0)  # equal lengths: no padding
        dataset = Dataset.from_dict({"prompt": [addition.prompt(a, b) for a, b in pairs]})
    else:
        model, tokenizer, dataset = loaded
    ends, cpu_ends = [], []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

    config = config_class(output_dir=str(out), per_device_train_batch_size=args.completions, num_generations=args.num_generations,
                          max_completion_length=args.length, generation_kwargs={"min_new_tokens": args.length}, temperature=1.0,
                          beta=0.04, learning_rate=1e-5, max_steps=args.steps, logging_steps=10**6, save_strategy="no", report_to="none",
                          use_cpu=not torch.cuda.is_available(), bf16=False, seed=0, disable_tqdm=True, log_level="error", **options)
    threads = torch.get_num_threads()
    trainer = trainer_class(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=config,
                            train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimes()])
    trainer.remove_callback(PrinterCallback)
    torch.set_num_threads(threads)  # the Trainer sets its own; keep the benchmark's
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    ends, cpu_ends = [start] + ends, [cpu_start] + cpu_ends
    if cpu is not None:
        cpu[:] = [b - a for a, b in zip(cpu_ends[1:], cpu_ends[2:])]
    return [b - a for a, b in zip(ends[1:], ends[2:])]  # the first step (warm-up) is not timed


def scoring_seconds(pretrained: Path, out: Path, args) -> dict[str, list[float]]:
    """Seconds of the reference pass + the loss and its backward, each side on the same generated batch,
    alternating `args.repeats` times (after one untimed pass each)."""
    trainers = {}
    for name, (trainer_class, config_class, options) in SIDES.items():
        model, tokenizer, _ = load_pretrained(pretrained)
        pairs = addition.eval_pairs(N_DIGITS + 1, "identical", 1, seed=0)
        dataset = Dataset.from_dict({"prompt": [addition.prompt(a, b) for a, b in pairs]})
        config = config_class(output_dir=str(out / name), per_device_train_batch_size=args.completions, num_generations=args.num_generations,
                              max_completion_length=args.length, generation_kwargs={"min_new_tokens": args.length}, temperature=1.0,
                              beta=0.04, use_cpu=not torch.cuda.is_available(), bf16=False, report_to="none", **options)
        threads = torch.get_num_threads()
        trainers[name] = trainer_class(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=config,
                                       train_dataset=dataset, processing_class=tokenizer)
        torch.set_num_threads(threads)
        trainers[name].current_gradient_accumulation_steps = 1
    ours = trainers["prioritized"]
    prompt = {"prompt": addition.prompt(*addition.eval_pairs(N_DIGITS + 1, "identical", 1, seed=0)[0])}
    inputs = ours._generate_and_score_completions([prompt] * args.completions)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]

    def once(trainer) -> float:
        t0 = time.perf_counter()
        trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, T, batch_size=args.completions)
        if trainer is ours:
            kl.prioritized_weights(ours._ref_certainty, 150.0)  # what _generate_and_score_completions adds
        trainer._compute_loss(trainer.model, inputs).backward()
        trainer.model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    seconds = {name: [] for name in trainers}
    for name, trainer in trainers.items():
        once(trainer)  # warm-up
    for r in range(args.repeats):
        for name in (list(trainers) if r % 2 == 0 else list(reversed(trainers))):
            seconds[name].append(once(trainers[name]))
    return seconds


# --- --qwen2: a real vocabulary, each side in its own process -------------------------------------------
QWEN2_VOCAB = 151_936  # Qwen2's vocabulary (embedding rows)
QWEN2_PROMPT_TOKENS = 32


def save_qwen2_model(root: Path, hidden: int, layers: int) -> Path:
    """A random-weight Qwen2ForCausalLM of Qwen2's vocabulary (tied embeddings, as Qwen2-0.5B and 1.5B) and a
    word-level tokenizer with one word per id (so that every sampled id decodes), saved in ``root``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), QWEN2_VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(root / "tokenizer.json"))
    config = Qwen2Config(vocab_size=QWEN2_VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128), max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root)
    return root


def load_qwen2(root: Path, n_prompts: int):
    """The saved model, its tokenizer (through PreTrainedTokenizerFast: AutoTokenizer would read the model's
    config and build a Qwen2 tokenizer that yields no tokens for these words) and ``n_prompts`` prompts of
    QWEN2_PROMPT_TOKENS words each (equal lengths: no padding)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(root)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(3, QWEN2_VOCAB, (n_prompts, QWEN2_PROMPT_TOKENS), generator=generator)
    dataset = Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in row.tolist()) for row in words]})
    assert len(tokenizer(dataset[0]["prompt"])["input_ids"]) == QWEN2_PROMPT_TOKENS
    return model, tokenizer, dataset


def child(args) -> None:
    """One side of --qwen2 in this process: prints its step times and its peak resident memory as JSON."""
    trainer_class, config_class, options = side(args.child)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loaded = load_qwen2(Path(args.model_dir), (args.completions // args.num_generations) * args.steps)
    cpu: list[float] = []
    seconds = step_seconds(trainer_class, config_class, Path(args.model_dir), Path(args.out), args, loaded=loaded, cpu=cpu, **options)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    print("RESULT " + json.dumps({"side": args.child, "seconds": seconds, "cpu_seconds": cpu, "peak_bytes": peak, "rss_before_bytes": rss_before}))


def run_child(side: str, model_dir: Path, out: Path, args) -> dict:
    command = [sys.executable, __file__, "--child", side, "--model-dir", str(model_dir), "--out", str(out), "--length", str(args.length),
               "--completions", str(args.completions), "--num-generations", str(args.num_generations), "--steps", str(args.steps)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{side} at {args.length} tokens failed:\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def qwen2_main(args) -> None:
    gib = 2**30
    sides = ["plain", *args.rules]
    print(f"TRL {__import__('trl').__version__}: random Qwen2ForCausalLM, V = {QWEN2_VOCAB:,}, hidden {args.hidden}, {args.layers} layers, tied "
          f"embeddings; {args.completions} completions per step ({args.num_generations} per prompt) of {QWEN2_PROMPT_TOKENS}-token prompts; "
          f"beta 0.04; rules {', '.join(args.rules)}; each side in its own process, {args.rounds} round(s) of {args.steps} steps "
          f"(the first not timed) per side and length")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_qwen2_model(Path(tmp) / "qwen2", args.hidden, args.layers)
        for length in args.lengths:
            args.length = length
            results = {name: [] for name in sides}  # per side, one result per round
            for r in range(args.rounds):
                order = sides if r % 2 == 0 else sides[::-1]
                for i, name in enumerate(order):
                    results[name].append(run_child(name, model_dir, Path(tmp) / f"side{i}-{length}-{r}", args))
                plain = results["plain"][-1]
                print(f"{length} tokens, round {r + 1}: plain {median(plain['seconds']):.2f} s/step, {median(plain['cpu_seconds']):.2f} CPU s/step, "
                      f"peak {plain['peak_bytes'] / gib:.2f} GiB; "
                      + "; ".join(f"{name} x{median(results[name][-1]['seconds']) / median(plain['seconds']):.3f} step, "
                                  f"x{median(results[name][-1]['cpu_seconds']) / median(plain['cpu_seconds']):.3f} CPU, "
                                  f"x{results[name][-1]['peak_bytes'] / plain['peak_bytes']:.3f} peak" for name in args.rules), flush=True)
            summary.append((length, results))
    print()
    for length, results in summary:
        step = {name: median([median(x["seconds"]) for x in results[name]]) for name in sides}
        peak = {name: median([x["peak_bytes"] for x in results[name]]) / gib for name in sides}
        print(f"{length} tokens: plain TRL {step['plain']:.2f} s/step, {peak['plain']:.2f} GiB peak")
        for name in args.rules:
            step_ratios = [median(x["seconds"]) / median(p["seconds"]) for x, p in zip(results[name], results["plain"])]
            memory_ratios = [x["peak_bytes"] / p["peak_bytes"] for x, p in zip(results[name], results["plain"])]
            cpu_ratios = [median(x["cpu_seconds"]) / median(p["cpu_seconds"]) for x, p in zip(results[name], results["plain"])]
            step_ratio, cpu_ratio, memory_ratio = median(step_ratios), median(cpu_ratios), median(memory_ratios)
            print(f"  {name}: {step[name]:.2f} s/step, {peak[name]:.2f} GiB peak; / plain: step time {step_ratio:.3f} "
                  f"({', '.join(f'{x:.3f}' for x in step_ratios)}), step CPU time {median(cpu_ratios):.3f} "
                  f"({', '.join(f'{x:.3f}' for x in cpu_ratios)}), peak memory {memory_ratio:.3f} ({', '.join(f'{x:.3f}' for x in memory_ratios)}); "
                  f"targets: step +5% in wall time {'met' if step_ratio <= 1.05 else 'NOT met'} ({100 * (step_ratio - 1):+.1f}%), "
                  f"in CPU time {'met' if cpu_ratio <= 1.05 else 'NOT met'} ({100 * (cpu_ratio - 1):+.1f}%), "
                  f"peak +10% {'met' if memory_ratio <= 1.10 else 'NOT met'} ({100 * (memory_ratio - 1):+.1f}%)")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, 64-token completions")
    parser.add_argument("--preset", default="tiny", help="model size (tiny; paper is slow on a CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, --quick 1)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per trainer and round (the first not timed)")
    parser.add_argument("--completions", type=int, default=16, help="completions per step")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--length", type=int, default=None, help="completion length, forced (default 128, --quick 64)")
    parser.add_argument("--repeats", type=int, default=20, help="alternating repeats of the reference pass + loss timing")
    parser.add_argument("--qwen2", action="store_true", help="a random model of Qwen2's shape and vocabulary (151,936), each side in its "
                        "own process: step time and peak memory at --lengths (defaults then: 8 completions, 3 steps, 2 rounds)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512], help="--qwen2: completion lengths, forced")
    parser.add_argument("--hidden", type=int, default=128, help="--qwen2: hidden size")
    parser.add_argument("--layers", type=int, default=2, help="--qwen2: layers")
    parser.add_argument("--rules", nargs="+", default=BUILT_IN_RULES, help="--qwen2: the KL weight rules (critical_tokens/kl_rules.py text), "
                        "each a side of its own against plain TRL (default: every built-in and a product)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    add_thread_argument(parser)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            torch.set_num_threads(args.threads)
        return child(args)
    if args.qwen2:
        if "--completions" not in sys.argv:
            args.completions = 8
        if "--steps" not in sys.argv:
            args.steps = 3
        args.rounds = args.rounds or 2
        machine_header("benchmarks/trl_prioritized.py --qwen2: step time and peak memory, KL weight rules vs plain TRL", args.threads)
        return qwen2_main(args)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.length = args.length or (64 if args.quick else 128)
    machine_header(f"benchmarks/trl_prioritized.py: seconds per GRPO step, prioritized KL vs plain TRL ({args.preset})", args.threads)
    import trl

    print(f"TRL {trl.__version__}: {args.completions} completions per step ({args.num_generations} per prompt) of {args.length} tokens "
          f"(forced), beta 0.04; prioritized: prioritized_beta 150, certainty max_prob at temperature 4, k3; "
          f"{args.rounds} round(s) of {args.steps} steps per trainer, the first not timed")
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = save_random_model(Path(tmp) / "pretrained", args.preset)
        ratios, times = [], {name: [] for name in SIDES}
        for r in range(args.rounds):
            order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
            seconds = {}
            for name in order:
                trainer_class, config_class, options = SIDES[name]
                seconds[name] = median(step_seconds(trainer_class, config_class, pretrained, Path(tmp) / f"{name}-{r}", args, **options))
                times[name].append(seconds[name])
            ratios.append(seconds["prioritized"] / seconds["plain"])
            print(f"round {r + 1}: plain {seconds['plain']:.2f} s/step, prioritized {seconds['prioritized']:.2f} s/step, "
                  f"prioritized / plain = {ratios[-1]:.3f}")
        scoring = scoring_seconds(pretrained, Path(tmp) / "scoring", args)
    ratio = median(ratios)
    plain_step = median(times["plain"])
    extra = median([o - p for o, p in zip(scoring["prioritized"], scoring["plain"])])
    print(f"\n{args.preset}: plain TRL {median(times['plain']):.2f} s/step, prioritized {median(times['prioritized']):.2f} s/step; "
          f"prioritized / plain = {ratio:.3f} (median of {args.rounds} rounds: " + ", ".join(f"{x:.3f}" for x in ratios) + ")")
    print(f"reference pass + loss and backward, alone ({args.repeats} alternating repeats, medians): plain "
          f"{1000 * median(scoring['plain']):.0f} ms, prioritized {1000 * median(scoring['prioritized']):.0f} ms; the extra "
          f"{1000 * extra:.1f} ms per step is {100 * extra / plain_step:.1f}% of plain TRL's step")
    print(f"target (issue 13): within 5% of plain TRL: whole steps {'met' if ratio <= 1.05 else 'NOT met'} ({100 * (ratio - 1):+.1f}%), "
          f"the parts that differ {'met' if extra / plain_step <= 0.05 else 'NOT met'} ({100 * extra / plain_step:+.1f}%)")


if __name__ == "__main__":
    main()
