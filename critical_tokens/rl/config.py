"""The RL command's options (``critical-tokens rl --help``), their validation, checked before anything
is written, and the values derived from them once: :class:`RLConfig`, :func:`validate`, and
:class:`Resolved` (:func:`derive`, completed by rl/calibration.py), which config.json saves and
``--resume`` reads back."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Literal

from .. import addition, checks, kl_rules
from ..config import arg, check_fields, check_range, flag
from ..model import RL_SLACK
from ..runs import UserError


CRITIC_ALGORITHMS = ("a2c", "ppo")  # the algorithms with a value head; grpo and rloo use group baselines


@dataclass(frozen=True)
class RLConfig:
    pretrained: str = arg(None, "pre-training run to fine-tune (its model/ is the policy's start and the frozen reference)", positional=True, metavar="PRETRAINED_RUN")
    out: str = arg("runs/rl", "run directory to create")
    algorithm: Literal["a2c", "ppo", "grpo", "rloo"] = arg("a2c", "a2c (the paper's), ppo (clipped ratio, several epochs per collect, critic), or grpo / rloo (group baselines over --group-size episodes per prompt, no critic)")
    group_size: int = arg(8, "grpo, rloo: episodes per prompt (--batch-size must be a multiple of it)")
    update_epochs: int | None = arg(None, "passes over each collect (default: 4 for ppo, 1 otherwise)")
    detach_critic: bool = arg(False, "a2c, ppo: the value head reads the transformer's hidden states detached, so value-loss gradients do not reach the language model (the paper: shared)")
    clip_range: float = arg(0.2, "ppo, grpo, rloo: epsilon of the clipped probability ratio")
    kl: Literal["none", "standard", "prioritized"] = arg("prioritized", "KL penalty to the pre-trained model: none, standard, or prioritized by the reference's certainty (the paper's method)")
    beta: str = arg("150", "prioritized KL exponent: w = c^beta (the paper: 150), or 'auto' to calibrate it on the reference model (see --auto-beta-quantile)")
    kl_coef: float = arg(5.0, "alpha, the KL coefficient (the paper: 5 for sec. 5.3, 10 for sec. 5.2)")
    estimator: Literal["k1", "k2", "k3"] = arg("k2", "Schulman's KL estimator (the paper: k2)")
    kl_weights: str | None = arg(None, "the per-token KL weights as a rule (critical_tokens/kl_rules.py), in place of the ones --kl and --beta give "
                                 "(prioritized: prioritized:BETA; standard: uniform:1): prioritized:8, prioritized:auto (calibrated as --beta auto), "
                                 "uniform:0.02, ignore:=,+ (w = 0 on these token texts; \\, a comma, \\x20 a space, \\n a newline), ignore_ids:0,5, "
                                 "entropy_quantile:0.2 (w = 0 on the 20% of a collect's tokens where the reference's entropy is highest), or a "
                                 "product such as prioritized:8*ignore:\\x20. Needs --kl prioritized or standard, and --beta left at its default")
    certainty: Literal["max_prob", "negentropy"] = arg("max_prob", "certainty c(s) of the reference: eq. 2 max_prob (the paper's) or eq. 1 negentropy")
    certainty_temperature: float = arg(4.0, "temperature of the reference distribution in c(s) (the paper: 4)")
    match_weight_beta: float | None = arg(None, "standard KL only: scale --kl-coef by E[c^beta], the mean prioritized weight at this beta measured on the reference's own rollouts at the RL temperature before RL (a uniform penalty of the prioritized arm's mean strength; the factor is stored in config.json)")
    method: Literal["kl", "entropy80", "archer", "kl_cov", "clip_cov"] = arg("kl", "token-level method (token_weights.py): kl (the --kl penalty alone); entropy80 (policy gradient on the --entropy-quantile highest-entropy tokens only, Wang et al. 2025); archer (on each response's high-entropy tokens, above its --archer-quantile: clip range --archer-clip-high and KL x --archer-high-kl-scale); kl_cov (penalty --kl-cov-coef |log r| on the --cov-ratio tokens of highest covariance, no clipping); clip_cov (no gradient on --cov-ratio random tokens of covariance between --clip-cov-low and --clip-cov-high); all but kl need --algorithm ppo, grpo or rloo. The --kl penalty applies under every method")
    entropy_quantile: float = arg(0.2, "entropy80: the share rho of highest-entropy tokens that get a policy gradient (the paper's 0.2)")
    archer_quantile: float = arg(0.8, "archer: the per-response entropy quantile above which a token is high-entropy (the source's 0.8)")
    archer_clip_high: float = arg(0.5, "archer: the clip range of the high-entropy tokens (the others keep --clip-range; the source: 0.5 and 0.2)")
    archer_high_kl_scale: float = arg(0.0, "archer: the KL term of the high-entropy tokens relative to the others' (each group averaged on its own, as the source; its script: 0)")
    cov_ratio: float = arg(2e-4, "kl_cov, clip_cov: the share of a minibatch's tokens selected by covariance (the source's 2e-4; at least one token)")
    kl_cov_coef: float = arg(1.0, "kl_cov: kappa, the coefficient of |log r| on the selected tokens (the source's recipes: 1)")
    clip_cov_low: float = arg(1.0, "clip_cov: the lower covariance bound of the tokens eligible for the gradient stop (the source's 1)")
    clip_cov_high: float = arg(5.0, "clip_cov: the upper covariance bound (the source's 5)")
    kl_as_reward: bool = arg(False, "put -kl_coef * w * k into the per-token reward (as TRL's PPO) instead of a loss term")
    auto_beta_quantile: float = arg(0.05, "--beta auto: the certainty quantile of the reference's own rollouts whose weight is --auto-beta-weight")
    auto_beta_weight: float = arg(0.5, "--beta auto: the weight at that quantile")
    temperature: float = arg(2.0, "policy temperature for sampling and for the log-probs in the loss (the paper: 2)")
    task: Literal["plus1", "plus2"] = arg("plus1", "RL additions with N+1 or N+2 digits")
    episodes: int = arg(2000, "training episodes in total")
    batch_size: int = arg(64, "episodes per collect (the paper: 50)")
    minibatch_size: int = arg(32, "episodes per gradient step")
    lr: float = arg(2e-5, "Adam learning rate (the paper: 1e-6 with a step every 2 tokens; retuned for minibatch steps)")
    vf_coef: float = arg(0.1, "value loss coefficient")
    ent_coef: float = arg(0.001, "entropy bonus coefficient")
    gamma: float = arg(1.0, "discount")
    gae_lambda: float = arg(0.95, "GAE lambda")
    grad_clip: float = arg(1.0, "gradient-norm clipping")
    eval_every: int = arg(256, "episodes between evaluations and checkpoints")
    eval_episodes: int = arg(100, "evaluation episodes on the RL task (greedy and sampled)")
    eval_comfort_episodes: int = arg(20, "evaluation episodes in the comfort zone (N digits)")
    probe_examples: int = arg(64, "fixed N+1 probe prompts for the critical-token probabilities")
    final_eval_episodes: int = arg(200, "the final evaluation's episodes on the RL task (greedy and sampled), at the end of the run")
    final_eval_comfort_episodes: int = arg(100, "the final evaluation's episodes in the comfort zone (N digits)")
    final_probe_examples: int = arg(100, "the final evaluation's probe prompts for the critical-token probabilities")
    n_digits: int | None = arg(None, "N, the digits the model was pre-trained on (default: the N the model records)")
    seed: int = arg(0, "seed of the prompts, the sampling and the value head")
    device: str = arg("auto", "auto, cpu or cuda")
    resume: bool = arg(False, "continue an interrupted run in --out from its last checkpoint")


# The options of one --method each: given away from their default to another method, they would be ignored.
METHOD_OPTIONS = {"entropy80": ("entropy_quantile",), "archer": ("archer_quantile", "archer_clip_high", "archer_high_kl_scale"),
                  "kl_cov": ("cov_ratio", "kl_cov_coef"), "clip_cov": ("cov_ratio", "clip_cov_low", "clip_cov_high")}


def validate(config: RLConfig) -> None:
    if config.pretrained is None:
        raise UserError("give the pre-training run to fine-tune: critical-tokens rl PRETRAINED_RUN")
    check_fields(config)
    checks.parse_beta("--beta", config.beta)
    check_range(config, ("kl_coef", "vf_coef", "ent_coef", "grad_clip"), 0)
    check_range(config, ("temperature", "certainty_temperature", "lr"), 0, low_open=True)
    check_range(config, ("episodes", "batch_size", "minibatch_size", "eval_every", "eval_episodes", "probe_examples",
                         "final_eval_episodes", "final_eval_comfort_episodes", "final_probe_examples"), 1)
    if config.method != "kl" and config.algorithm not in ("ppo", "grpo", "rloo"):
        raise UserError(f"--method {config.method} acts through the importance ratio: it needs --algorithm ppo, grpo or rloo, got {config.algorithm}")
    defaults = RLConfig()
    for name in sorted({n for names in METHOD_OPTIONS.values() for n in names} - set(METHOD_OPTIONS.get(config.method, ()))):
        if getattr(config, name) != getattr(defaults, name):
            owners = " and ".join(m for m, names in METHOD_OPTIONS.items() if name in names)
            raise UserError(f"{flag(RLConfig, name)} is an option of --method {owners}; --method {config.method} would ignore it")
    check_range(config, ("entropy_quantile",), 0, 1, low_open=True)
    check_range(config, ("archer_quantile", "cov_ratio"), 0, 1, low_open=True, high_open=True)
    check_range(config, ("archer_clip_high",), 0, low_open=True)
    check_range(config, ("archer_high_kl_scale", "kl_cov_coef"), 0)
    if not config.clip_cov_low < config.clip_cov_high:
        raise UserError(f"--clip-cov-low must be below --clip-cov-high, got {config.clip_cov_low} and {config.clip_cov_high}")
    if config.match_weight_beta is not None:
        if config.kl != "standard":
            raise UserError(f"--match-weight-beta scales the standard penalty: it needs --kl standard, got --kl {config.kl}")
        checks.parse_beta("--match-weight-beta", config.match_weight_beta)
    if config.kl_weights is not None:
        if config.kl == "none":
            raise UserError("--kl-weights weights the KL penalty: it needs --kl prioritized or standard, got --kl none")
        if config.beta != RLConfig.beta:
            raise UserError(f"give the KL weights once: --kl-weights {config.kl_weights} or --beta {config.beta}, not both")
        kl_weight_rule(config)  # a bad rule stops here, before anything is written
    checks.quantile_and_weight("--auto-beta-quantile", config.auto_beta_quantile, "--auto-beta-weight", config.auto_beta_weight)
    if config.algorithm in ("grpo", "rloo") and (config.group_size < 2 or config.batch_size % config.group_size):
        raise UserError(f"--algorithm {config.algorithm}: --group-size must be >= 2 and divide --batch-size, got {config.group_size} and {config.batch_size}")
    if config.detach_critic and config.algorithm not in CRITIC_ALGORITHMS:
        raise UserError(f"--detach-critic: --algorithm {config.algorithm} has no critic ({' and '.join(CRITIC_ALGORITHMS)} have one)")
    check_range(config, ("update_epochs",), 1)
    check_range(config, ("clip_range",), 0, low_open=True)
    check_range(config, ("gamma", "gae_lambda"), 0, 1)
    check_range(config, ("eval_comfort_episodes", "group_size"), 0, low_open=True)
    if config.minibatch_size > config.batch_size:
        raise UserError(f"--minibatch-size ({config.minibatch_size}) must be at most --batch-size ({config.batch_size}), the episodes of one collect")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the ranks torchrun starts (distributed.py)
    if min(config.minibatch_size, config.batch_size % config.minibatch_size or config.minibatch_size) < world:
        raise UserError(f"every minibatch needs an episode per rank: --minibatch-size {config.minibatch_size} with "
                        f"--batch-size {config.batch_size} leaves a minibatch of {config.batch_size % config.minibatch_size} for {world} ranks")


def kl_weight_rule(config: RLConfig, tokenizer=None) -> kl_rules.Rule | None:
    """The rule of the per-token KL weights (kl_rules), parsed once: --kl-weights, or the one --kl and
    --beta give (prioritized: prioritized:BETA; standard: uniform:1); None for --kl none. ``tokenizer``:
    the token texts of ignore: become its ids. A beta 'auto' is left for the caller to calibrate."""
    if config.kl == "none":
        return None
    if config.kl_weights is not None:
        rule = kl_rules.parse(config.kl_weights)
    else:
        rule = kl_rules.uniform(1.0) if config.kl == "standard" else kl_rules.prioritized(config.beta)
    return rule if tokenizer is None else rule.bind(tokenizer)


@dataclass(frozen=True)
class Resolved:
    """What an RL run derives from its options and its models, computed once at start-up, saved in
    config.json (each field a top-level key) and read back on ``--resume``: the one source of every
    value the loop uses beyond :class:`RLConfig`'s own fields."""

    n_digits: int  # N, the digits the model was pre-trained on
    plus: int  # the digits the RL task adds to N: 1 (plus1) or 2 (plus2)
    group_size: int  # episodes per prompt: --group-size for grpo and rloo, 1 for a2c and ppo
    prompts_per_collect: int  # --batch-size / group_size
    update_epochs: int  # passes over each collect: --update-epochs, or 4 for ppo and 1 otherwise
    iterations: int  # collects in the run: ceil(--episodes / --batch-size)
    max_new_tokens: int  # the length limit of an episode (docs/method.md section 4)
    beta: float  # the exponent of c^beta: --beta, or calibrated (rl/calibration.py); 0 for 'auto' before or without calibration
    beta_calibration: dict  # --beta auto: the certainty quantiles it was calibrated on; else {}
    kl_weights_rule: str | None  # the rule of the per-token KL weights (kl_rules), its beta resolved; None: no KL
    kl_coef_used: float  # the KL coefficient applied: --kl-coef, or --kl-coef x E[c^beta] (--match-weight-beta)
    kl_calibration: dict  # --match-weight-beta: how E[c^beta] was measured; else {}

    def record(self) -> dict:
        """The fields as config.json's top-level keys."""
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, record: dict, derived: Resolved) -> Resolved:
        """The values a run saved (``record``: its config.json), read back on --resume; ``derived`` (:func:`derive`)
        gives those an older run did not save."""
        return dataclasses.replace(derived, **{f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record})


def derive(config: RLConfig, n_digits: int, kl_rule: kl_rules.Rule | None) -> Resolved:
    """The values that follow from the options alone (``kl_rule``: kl_weight_rule's, None for no KL): a
    beta 'auto' and the matched-weight coefficient are left to rl/calibration.py, which measures them on the
    reference model."""
    plus = int(config.task[-1])
    group_size = config.group_size if config.algorithm in ("grpo", "rloo") else 1
    beta = checks.parse_beta("--beta", config.beta)
    beta = 0.0 if beta is None else beta
    return Resolved(n_digits=n_digits, plus=plus, group_size=group_size, prompts_per_collect=config.batch_size // group_size,
                    update_epochs=config.update_epochs or (4 if config.algorithm == "ppo" else 1),
                    iterations=math.ceil(config.episodes / config.batch_size),
                    max_new_tokens=addition.max_completion_length(n_digits + plus) + RL_SLACK,
                    beta=beta, beta_calibration={}, kl_weights_rule=None if kl_rule is None else str(kl_rule),
                    kl_coef_used=config.kl_coef, kl_calibration={})
