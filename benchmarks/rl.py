"""Episodes per minute of the RL loop against the paper's design and TRL (issue 3, "Performance").

Same random-weight model (`tiny` by default), the "plus 1" task from N = 7 (8-digit additions):

    ours          critical_tokens.rl.loop.train, the real command, on a pre-training run saved in a temporary
                  directory; episodes/min from its own phase timers in metrics.jsonl
                  (time/rollout + time/reference + time/update; its evaluations are excluded)
    paper design  two environments (batch 2), one token per environment step, the whole prefix run
                  through the model at every step (no KV cache), and an A2C optimizer step on the pair
                  of transitions at every step, i.e. every 2 tokens: a policy + value forward with
                  gradient and a reference forward on the 2 states, a KL-penalised A2C loss, backward,
                  Adam. The action forward also gives V(s_t), which bootstraps the update of the
                  previous transition (a lower bound on the design's cost: no extra forward for it).
                  Timed for a few steps at a few prefix lengths, then integrated over a whole episode.
    TRL           (optional, if `import trl` works) GRPOTrainer on the same model and tokenizer,
                  600-token completions (min_new_tokens: no early stop), 32 completions per optimizer
                  step, beta 0.04, reward +1/-1 from addition.is_correct; episodes/min from its step time.

The random weights are edited so that end-of-text is never sampled (`never_end_of_text`), and random
text never contains the addition's stop rule, so every episode runs to the maximum length,
max_completion_length(N + 1) + 100 = 725 tokens for N = 7: about the length of the issue's
600-725-token episodes. Ours and the paper design run interleaved in rounds; TRL once, in between.
The FLOP limit of one episode (generation + reference and policy scoring passes + one backward =
5 forward passes, with forward FLOPs per token 2 N + 2 n_layer T d_model, Kaplan et al. 2020) at the
measured float32 matmul throughput gives the episodes/min ceiling printed at the end.

    .venv/bin/python benchmarks/rl.py                   # a few minutes on 2 cores (tiny; TRL if installed)
    .venv/bin/python benchmarks/rl.py --quick           # ~30 s (batch 16, no TRL)
    .venv/bin/python benchmarks/rl.py --preset paper    # 85M: a few episodes, slow on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the command's progress bar would interleave with the report

import numpy as np
import torch

from critical_tokens import addition, kl
from critical_tokens.policy import entropy_from_logits, token_logprobs
from critical_tokens.rl.a2c import ValueHead
from critical_tokens.model import RL_SLACK, build_model
from critical_tokens.rl.loop import train
from critical_tokens.rl.config import RLConfig
from critical_tokens.tokenizer import CHARACTERS, build_tokenizer, encode

from common import add_thread_argument, fmt_rate, forward_flops_per_token, machine_header, median, peak_matmul_flops_per_s

N_DIGITS = 7
PLUS = 1
ISSUE_TRL_TINY = 121  # episodes/min the issue measured for TRL GRPOTrainer at tiny (2 threads, no other load)
ISSUE_LIMIT = {"tiny": 2300, "paper": 24}  # the issue's FLOP-limit estimates (episodes/min)


def never_end_of_text(model, eos_token_id: int) -> None:
    """Makes a random-weight GPT-2 unable to sample end-of-text, so that every episode runs to the
    maximum length (at temperature 2 a random model would otherwise end after ~|V| tokens).

    Channel 0 of the final LayerNorm's output is made the constant 1 (weight 0, bias 1) and the
    (tied) embedding column 0 is -1e4 for end-of-text and 0 for every other token: the end-of-text
    logit is ~-1e4, the others are unchanged by the constant channel. The cost of every pass is the same.
    """
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[eos_token_id, 0] = -1e4


def save_pretrained_run(root: Path, preset: str) -> Path:
    """A random-weight model laid out as a critical_tokens pre-training run: RUN/model/."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(preset, tokenizer, N_DIGITS)
    never_end_of_text(model, tokenizer.eos_token_id)
    model.config.critical_tokens_n_digits = N_DIGITS
    run = root / f"pretrained-{preset}"
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    return run


# ---------------------------------------------------------------------------------------------- ours
def run_ours(pretrained: Path, out: Path, batch_size: int, minibatch_size: int, iterations: int) -> dict:
    """critical_tokens.rl.loop.train for a few iterations; its phase timers give episodes/min."""
    config = RLConfig(pretrained=str(pretrained), out=str(out), episodes=iterations * batch_size, batch_size=batch_size,
                      minibatch_size=minibatch_size, eval_every=10**9, eval_episodes=1, eval_comfort_episodes=1,
                      probe_examples=1, final_eval_episodes=1, final_eval_comfort_episodes=1, final_probe_examples=1, device="cpu")
    t0 = time.perf_counter()
    train(config)
    wall = time.perf_counter() - t0
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    phases = {k: last[f"time/{k}"] for k in ("rollout", "reference", "update")}
    return {"episodes": last["episodes"], "phases": phases, "seconds": sum(phases.values()), "wall": wall,
            "episode_length": last["episode_length"], "truncated": last["truncated"],
            "episodes_per_min": 60 * last["episodes"] / sum(phases.values())}


# -------------------------------------------------------------------------------------- paper design
class PaperDesign:
    """The paper's loop: 2 environments, no KV cache, an A2C step on every pair of transitions."""

    def __init__(self, pretrained: Path, config: RLConfig):
        from critical_tokens.pretrain import load_pretrained

        self.config = config
        self.lm, self.tokenizer, _ = load_pretrained(pretrained)
        self.ref_lm, _, _ = load_pretrained(pretrained)
        self.ref_lm.eval().requires_grad_(False)
        self.lm.train()
        self.value_head = ValueHead(self.lm.config.n_embd)
        params = list(self.lm.parameters()) + list(self.value_head.parameters())
        self.optimizer = torch.optim.Adam(params, lr=config.lr)
        self.params = params
        self.generator = torch.Generator().manual_seed(0)

    def step(self, ids: torch.Tensor, previous):
        """One environment step of both environments: act on the whole prefix (no cache), then an A2C
        update on the previous pair of transitions, bootstrapped with V(s_t). ids: (2, P + t)."""
        c = self.config
        with torch.no_grad():  # 1. act
            out = self.lm(input_ids=ids, output_hidden_states=True)
            logits = out.logits[:, -1] / c.temperature  # (2, V)
            next_value = self.value_head(out.hidden_states[-1][:, -1])  # (2,) V(s_t)
            action = torch.multinomial(torch.softmax(logits, -1), 1, generator=self.generator)  # (2, 1)
        if previous is not None:  # 2. A2C step on (s_{t-1}, a_{t-1}), reward 0 before the end
            prev_ids, prev_action = previous
            out = self.lm(input_ids=prev_ids, output_hidden_states=True)
            logits = out.logits[:, -1] / c.temperature  # (2, V)
            value = self.value_head(out.hidden_states[-1][:, -1])  # (2,)
            logprobs = token_logprobs(logits, prev_action[:, 0])  # (2,)
            with torch.no_grad():
                ref_logits = self.ref_lm(input_ids=prev_ids).logits[:, -1]  # (2, V)
                ref_logprobs = token_logprobs(ref_logits / c.temperature, prev_action[:, 0])
                weights = kl.prioritized_weights(kl.certainty(ref_logits, c.certainty, c.certainty_temperature), float(c.beta))
            advantage = (c.gamma * next_value - value).detach()
            actor_loss = -(advantage * logprobs).mean()
            value_loss = 0.5 * ((c.gamma * next_value - value) ** 2).mean()
            entropy = entropy_from_logits(logits).mean()
            kl_term = (weights * kl.kl_estimate(logprobs, ref_logprobs, c.estimator)).mean()
            loss = actor_loss + c.vf_coef * value_loss - c.ent_coef * entropy + c.kl_coef * kl_term
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
            self.optimizer.step()
        return torch.cat([ids, action], 1), (ids, action)

    def episode_seconds(self, prompts: list[list[int]], episode_length: int, positions: int, steps: int) -> tuple[float, list]:
        """Seconds for one episode of both environments: the step time measured at `positions` prefix
        lengths (`steps` steps each, after one untimed step), integrated over the episode's steps."""
        filler = torch.randint(0, len(CHARACTERS), (2, episode_length), generator=torch.Generator().manual_seed(1))
        prompt = torch.tensor(prompts[:2])  # (2, P) same-length prompts
        samples = []
        for t in np.linspace(0, episode_length - steps - 1, positions).astype(int).tolist():
            ids = torch.cat([prompt, filler[:, :t]], 1)
            ids, previous = self.step(ids, None)  # untimed: fills `previous`
            t0 = time.perf_counter()
            for _ in range(steps):
                ids, previous = self.step(ids, previous)
            samples.append((t + 1, (time.perf_counter() - t0) / steps))
        xs, ys = zip(*samples)
        per_step = np.interp(np.arange(episode_length), xs, ys)  # linear in the prefix length, as the cost is
        return float(per_step.sum()), samples


# ----------------------------------------------------------------------------------------------- TRL
def run_trl(pretrained: Path, out: Path, completion_length: int, completions_per_step: int, num_generations: int,
            steps: int, beta: float, gpu: bool = False) -> dict:
    """TRL's GRPOTrainer for `steps` optimizer steps (the first is not timed); episodes/min. ``gpu``:
    on the GPU in bf16 (benchmarks/gpu.py), else on the CPU in float32."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from critical_tokens.pretrain import load_pretrained

    model, tokenizer, _ = load_pretrained(pretrained)
    pairs = addition.rl_pairs(N_DIGITS, PLUS, completions_per_step * (steps + 1), seed=0)
    dataset = Dataset.from_dict({"prompt": [addition.prompt(a, b) for a, b in pairs], "a": [a for a, _ in pairs], "b": [b for _, b in pairs]})

    def addition_reward(completions, a, b, **kwargs):
        return [1.0 if addition.is_correct(x, y, text) else -1.0 for x, y, text in zip(a, b, completions)]

    step_ends = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=completions_per_step, num_generations=num_generations,
                      gradient_accumulation_steps=1, max_completion_length=completion_length,
                      generation_kwargs={"min_new_tokens": completion_length}, temperature=1.0, beta=beta, max_steps=steps,
                      learning_rate=1e-5, logging_steps=10**6, log_level="error", save_strategy="no", report_to="none", use_cpu=not gpu, bf16=gpu,
                      dataloader_num_workers=0, seed=0, disable_tqdm=True)
    threads = torch.get_num_threads()
    trainer = GRPOTrainer(model=model, reward_funcs=addition_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimes()])
    trainer.remove_callback(PrinterCallback)  # its end-of-training log dict would clutter the report
    torch.set_num_threads(threads)  # keep the thread count of the rest of the benchmark
    t0 = time.perf_counter()
    trainer.train()
    ends = [t0] + step_ends
    # Skip the first (warm-up) step; with a single step, time it, trainer start-up included.
    step_seconds = [b - a for a, b in zip(ends[1:], ends[2:])] or [ends[1] - ends[0]]
    seconds = median(step_seconds)
    return {"step_seconds": step_seconds, "episodes_per_min": 60 * completions_per_step / seconds}


def trl_available() -> str | None:
    try:
        import datasets  # noqa: F401
        import trl

        return trl.__version__
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------- main
def flops_per_episode(model, sequence_length: float) -> float:
    """Generation + reference pass + policy pass (3 forwards) + one backward (2 forwards)."""
    return 5 * sequence_length * forward_flops_per_token(model, sequence_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 16, one round, no TRL (~30 s at tiny)")
    parser.add_argument("--preset", default="tiny", help="model size (tiny, or paper: slow on a CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds of ours and the paper design (default 2, --quick 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="our episodes per collect (default RLConfig's 64, --quick 16)")
    parser.add_argument("--iterations", type=int, default=1, help="our collect + update iterations per round")
    parser.add_argument("--positions", type=int, default=None, help="paper design: prefix lengths timed (default 8, --quick 2, paper 3)")
    parser.add_argument("--steps", type=int, default=None, help="paper design: steps timed at each prefix length (default 3, --quick and paper 1)")
    parser.add_argument("--trl", choices=("auto", "no"), default="auto", help="TRL GRPOTrainer comparison if installed")
    parser.add_argument("--trl-steps", type=int, default=None, help="TRL optimizer steps (default 3, the first not timed; paper 1, timed)")
    parser.add_argument("--trl-completions", type=int, default=None, help="TRL completions per optimizer step (default 32, paper 8)")
    parser.add_argument("--trl-length", type=int, default=600, help="TRL completion length (forced)")
    add_thread_argument(parser)
    args = parser.parse_args()
    quick, paper_size = args.quick, args.preset == "paper"
    rounds = args.rounds or (1 if quick or paper_size else 2)
    defaults = RLConfig()
    batch_size = args.batch_size or (16 if quick else 8 if paper_size else defaults.batch_size)
    args.trl_completions = args.trl_completions or (8 if paper_size else 32)
    args.trl_steps = args.trl_steps or (1 if paper_size else 3)
    minibatch_size = min(defaults.minibatch_size, batch_size)
    machine_header(f"benchmarks/rl.py: RL episodes/min, ours vs the paper's design{'' if args.trl == 'no' or quick else ' vs TRL'} ({args.preset})", args.threads)
    if paper_size:
        print("paper (85M) on a CPU: a few episodes per side, about 10-15 minutes with 1 thread (setup and the untimed "
              "evaluations of train() included); TRL with 8 completions, one timed step")

    tokenizer = build_tokenizer()
    episode_length = addition.max_completion_length(N_DIGITS + PLUS) + RL_SLACK
    pairs = addition.eval_pairs(N_DIGITS + PLUS, "identical", 2, seed=0)
    prompts = [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs]
    print(f"task plus{PLUS} from N = {N_DIGITS}: random weights (end-of-text made unsampleable) never produce the stop rule, so every episode runs to the maximum "
          f"length max_completion_length({N_DIGITS + PLUS}) + {RL_SLACK} = {episode_length} tokens (the issue: 600-725-token episodes)")
    print(f"ours: critical_tokens.rl.loop.train, RLConfig defaults (kl {defaults.kl}, beta {defaults.beta}) with batch {batch_size}, "
          f"minibatch {minibatch_size}, {args.iterations} iteration(s) per round; evaluation excluded")
    positions, steps = args.positions or (2 if quick else 3 if paper_size else 8), args.steps or (1 if quick or paper_size else 3)
    print(f"paper design: batch 2, no KV cache, an A2C step every environment step (2 tokens); {steps} step(s) timed at each of "
          f"{positions} prefix lengths and integrated (linear interpolation) over a {episode_length}-step episode")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pretrained = save_pretrained_run(root, args.preset)
        paper = PaperDesign(pretrained, defaults)
        n_params = sum(p.numel() for p in paper.lm.parameters())
        print(f"model: {args.preset}, {n_params / 1e6:.2f}M parameters")
        trl_version = trl_available() if args.trl == "auto" and not quick else None
        if args.trl == "auto" and not quick and trl_version is None:
            print("TRL comparison skipped: `import trl` / `import datasets` failed (pip install trl datasets)")
        ours_runs, paper_rates, trl_result, peaks = [], [], None, []
        for r in range(rounds):
            peaks.append(max(peak_matmul_flops_per_s(0.5).values()))
            ours = run_ours(pretrained, root / f"rl-{r}", batch_size, minibatch_size, args.iterations)
            seconds, samples = paper.episode_seconds(prompts, episode_length, positions, steps)
            paper_rate = 2 * 60 / seconds  # two environments finish an episode each
            ours_runs.append(ours)
            paper_rates.append(paper_rate)
            split = ", ".join(f"{k} {v:.1f} s ({100 * v / ours['seconds']:.0f}%)" for k, v in ours["phases"].items())
            print(f"round {r + 1}: ours {fmt_rate(ours['episodes_per_min'])} episodes/min ({ours['episodes']} episodes of mean length "
                  f"{ours['episode_length']:.0f}, {100 * ours['truncated']:.0f}% at the length limit, in {ours['seconds']:.1f} s: {split}; "
                  f"train() wall time incl. setup and evaluations {ours['wall']:.0f} s)")
            print(f"round {r + 1}: paper design {fmt_rate(paper_rate)} episodes/min (extrapolated: s/step "
                  + ", ".join(f"{dt:.3f} at prefix +{t}" for t, dt in samples) + f"; {seconds:.0f} s per pair of episodes); "
                  f"ours / paper design {ours['episodes_per_min'] / paper_rate:.0f}x")
            if r == 0 and trl_version:
                num_generations = 8 if args.trl_completions % 8 == 0 else args.trl_completions
                print(f"TRL {trl_version} GRPOTrainer: {args.trl_completions} completions per optimizer step ({num_generations} per prompt), "
                      f"{args.trl_length} tokens each (forced), beta 0.04, {args.trl_steps} steps" + (" (the first not timed)..." if args.trl_steps > 1 else " (timed, warm-up included)..."))
                trl_result = run_trl(pretrained, root / "trl", args.trl_length, args.trl_completions, num_generations, args.trl_steps, beta=0.04)
                print(f"TRL: {fmt_rate(trl_result['episodes_per_min'])} episodes/min (s/step: "
                      + ", ".join(f"{s:.1f}" for s in trl_result["step_seconds"]) + ")")

        ours_rate = median([o["episodes_per_min"] for o in ours_runs])
        ratio = median([o["episodes_per_min"] / p for o, p in zip(ours_runs, paper_rates)])
        print(f"\n{args.preset}: ours {fmt_rate(ours_rate)} episodes/min, paper design {fmt_rate(median(paper_rates))} episodes/min "
              f"(extrapolated from {positions} prefix lengths); ours / paper design = {ratio:.0f}x (median of {rounds} rounds)")
        phases = {k: sum(o["phases"][k] for o in ours_runs) for k in ours_runs[0]["phases"]}
        total = sum(phases.values())
        print("ours, time split: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in phases.items())
              + " (rollout = KV-cache sampling; reference = the frozen model's scoring pass; update = policy pass + backward + Adam)")
        if args.preset == "tiny":
            print(f"target (issue 3): >= 100x the paper design at tiny: {ratio:.0f}x, {'met' if ratio >= 100 else 'NOT met'}")
        if trl_result:
            trl_ratio = ours_rate / trl_result["episodes_per_min"]
            target = {"tiny": 5, "paper": 2}.get(args.preset)
            print(f"ours / TRL GRPOTrainer = {trl_ratio:.1f}x (TRL {fmt_rate(trl_result['episodes_per_min'])} episodes/min of "
                  f"{args.trl_length}-token completions; ours {episode_length}-token episodes, so per token the ratio is "
                  f"{trl_ratio * episode_length / args.trl_length:.1f}x)" + (f"; target >= {target}x: {'met' if trl_ratio >= target else 'NOT met'}" if target else ""))
            if args.preset == "tiny":
                print(f"(the issue's anchor for TRL at tiny: ~{ISSUE_TRL_TINY} episodes/min with 2 threads on an idle machine)")
        sequence = len(prompts[0]) + median([o["episode_length"] for o in ours_runs])
        flops = flops_per_episode(paper.lm, sequence)
        peak = median(peaks)
        limit = 60 * peak / flops
        print(f"FLOP limit: {flops / 1e9:.1f} GFLOP per episode of {sequence:.0f} tokens (5 forward passes of "
              f"{forward_flops_per_token(paper.lm, sequence) / 1e6:.2f} MFLOP/token) at the measured {peak / 1e9:.1f} GFLOP/s "
              f"float32 matmul = {fmt_rate(limit)} episodes/min; ours reaches {100 * ours_rate / limit:.0f}% of it "
              f"(the issue's estimate: ~{ISSUE_LIMIT.get(args.preset, '?')} episodes/min at 2 threads)")


if __name__ == "__main__":
    main()
