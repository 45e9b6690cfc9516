"""The prioritized KL penalty in TRL's ``GRPOTrainer``: a config and a trainer, for any Hugging Face causal LM.

    from critical_tokens.trl import PrioritizedGRPOConfig, PrioritizedGRPOTrainer

    args = PrioritizedGRPOConfig(output_dir="out", beta=0.04, prioritized_beta=150)  # beta: TRL's KL coefficient
    trainer = PrioritizedGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset)
    trainer.train()

TRL adds ``beta * k3_t`` to the loss of every completion token (k3: Schulman's estimator of
KL(pi || pi_ref)). This trainer makes that term ``beta * w_t * k_t``, the paper's eq. 1 (Vassoyan, Beau,
Plaud, "Ignore the KL Penalty! Boosting Exploration on Critical Tokens to Enhance RL Fine-Tuning",
NAACL Findings 2025), with

    w_t = c(s_t) ** prioritized_beta        (kl.prioritized_weights)
    c(s_t) = the reference model's certainty in the state of token t (kl.certainty, eq. 2 by default)
    k_t = kl.kl_estimate(logprobs, ref_logprobs, kl_estimator)     (TRL's k3 by default; the paper: k2)

so the policy may move freely on the tokens where the reference model was unsure ("critical" tokens)
and is held to it where the reference was confident. ``prioritized_beta=0`` gives TRL's own loss.

Everything else is TRL's: its reference model, generation, rewards, advantages, loss type and logging.
Only the reference pass changes: it computes the reference's logits at the completion positions once,
and takes from them both TRL's reference log-probs and the certainty (no extra forward pass). The
weight statistics are logged with TRL's metrics (``kl_weight/mean``, ``kl_weight/q05``, ...).
Requires the ``trl`` extra: ``pip install critical-tokens[trl]``; written against TRL 1.16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from . import kl
from .rl.a2c import token_logprobs

# TRL's loss types whose aggregation of per-token terms `token_aggregate` reproduces.
LOSS_TYPES = ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo")


@dataclass
class PrioritizedGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the prioritized KL penalty's options. ``beta`` stays TRL's KL coefficient
    (0 disables the KL and the reference model, as in TRL)."""

    prioritized_beta: float | str = field(default=150.0, metadata={"help": "exponent of the KL weights w = c^prioritized_beta (the paper: 150; 0: TRL's standard KL), or 'auto': calibrated on the reference's certainty over the first batch (kl.calibrate_beta)"})
    certainty: str = field(default="max_prob", metadata={"help": "certainty c(s) of the reference: 'max_prob' (the paper's eq. 2) or 'negentropy' (eq. 1)"})
    certainty_temperature: float = field(default=4.0, metadata={"help": "temperature of the reference distribution in c(s) (the paper: 4)"})
    kl_estimator: str = field(default="k3", metadata={"help": "Schulman's KL estimator weighted by w: 'k3' (TRL's), 'k2' (the paper's) or 'k1'"})
    auto_beta_quantile: float = field(default=0.05, metadata={"help": "prioritized_beta='auto': the certainty quantile whose weight is auto_beta_weight"})
    auto_beta_weight: float = field(default=0.5, metadata={"help": "prioritized_beta='auto': the weight at that quantile"})

    def __post_init__(self):
        super().__post_init__()
        if self.prioritized_beta != "auto":
            try:
                self.prioritized_beta = float(self.prioritized_beta)
            except (TypeError, ValueError):
                raise ValueError(f"prioritized_beta must be a number >= 0 or 'auto', got {self.prioritized_beta!r}") from None
            if not self.prioritized_beta >= 0:
                raise ValueError(f"prioritized_beta must be >= 0, got {self.prioritized_beta}")
        if self.certainty not in kl.CERTAINTY_METHODS:
            raise ValueError(f"certainty must be one of {', '.join(kl.CERTAINTY_METHODS)}, got {self.certainty!r}")
        if self.kl_estimator not in kl.ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(kl.ESTIMATORS)}, got {self.kl_estimator!r}")
        if not self.certainty_temperature > 0:
            raise ValueError(f"certainty_temperature must be > 0, got {self.certainty_temperature}")
        if not (0 < self.auto_beta_quantile < 1 and 0 < self.auto_beta_weight < 1):
            raise ValueError("auto_beta_quantile and auto_beta_weight must be in (0, 1)")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not supported; choose one of {', '.join(LOSS_TYPES)}")


class PrioritizedGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose per-token KL term is weighted by the reference's certainty (module
    docstring). Takes a :class:`PrioritizedGRPOConfig` as ``args``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, PrioritizedGRPOConfig):
            raise TypeError(f"args must be a PrioritizedGRPOConfig, got {type(self.args).__name__}")
        if self.beta != 0.0 and self.ref_model is None:
            raise ValueError("the prioritized KL penalty needs TRL's reference model (PEFT adapters are not supported)")
        # None until calibrated on the first batch when prioritized_beta is 'auto'.
        self.prioritized_beta = None if self.args.prioritized_beta == "auto" else self.args.prioritized_beta
        self._policy_logprobs = None  # (B, T) of the last policy pass, read by _compute_loss
        self._ref_certainty = None  # (B, T) of the last reference pass, read by _generate_and_score_completions

    # --- the reference pass: TRL's log-probs and the certainty from the same logits -----------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs):
        if model is self.ref_model:
            return self._reference_pass(model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)
        logprobs, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)
        self._policy_logprobs = logprobs
        return logprobs, entropies, aux_loss

    @torch.no_grad()
    def _reference_pass(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs):
        """The reference's log-probs of the completion tokens at TRL's temperature (what TRL computes)
        and its certainty c(s) at ``certainty_temperature``, from one forward pass; (B, T) each."""
        if any(value is not None for value in kwargs.values()):
            raise NotImplementedError("the prioritized KL penalty supports text-only models")
        batch_size = batch_size or input_ids.size(0)
        ref_logprobs, certainty = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            with self.accelerator.autocast():
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1, use_cache=False).logits
            logits = logits[:, :-1].float()  # (b, T, V): the state before completion token t predicts it
            ref_logprobs.append(token_logprobs(logits / self.temperature, ids[:, -logits_to_keep:]))
            certainty.append(kl.certainty(logits, self.args.certainty, self.args.certainty_temperature))
        self._ref_certainty = torch.cat(certainty)
        return torch.cat(ref_logprobs), None, None

    # --- the KL weights, once per generation batch ---------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.beta == 0.0:
            return output
        certainty, mask = self._ref_certainty, output["completion_mask"].bool()  # (B, T)
        if self.prioritized_beta is None:  # 'auto': calibrated once, on the first batch
            self.prioritized_beta = kl.calibrate_beta(certainty[mask], self.args.auto_beta_quantile, self.args.auto_beta_weight)
        weights = kl.prioritized_weights(certainty, self.prioritized_beta)  # (B, T)
        output["kl_weights"] = weights
        mode = "train" if self.model.training else "eval"
        w = weights[mask]
        if w.numel():
            for name, value in (("kl_weight/mean", w.mean()), ("kl_weight/q05", torch.quantile(w, 0.05)),
                                ("kl_weight/q50", torch.quantile(w, 0.5)), ("certainty/mean", certainty[mask].mean())):
                self._metrics[mode][name].append(value.item())
        self._metrics[mode]["prioritized_beta"].append(self.prioritized_beta)
        return output

    # --- the loss: TRL's, with beta * w * k in place of beta * k3 ------------------------------------
    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)  # TRL's loss, beta * k3 on every token included
        if self.beta == 0.0:
            return loss
        logprobs, ref_logprobs = self._policy_logprobs, inputs["ref_per_token_logps"]  # (B, T), set by the pass TRL just ran
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        # The paper's eq. 1 in place of TRL's term: add beta * (w * k - k3) to each token's loss. (TRL writes
        # k3 as exp(d) - d - 1, kl.kl_estimate as expm1(d) - d: the same function up to float32 rounding.)
        prioritized = inputs["kl_weights"] * kl.kl_estimate(logprobs, ref_logprobs, self.args.kl_estimator)  # (B, T)
        standard = kl.kl_estimate(logprobs, ref_logprobs, "k3")  # (B, T)
        change = prioritized - standard  # (B, T)
        if self.args.use_bias_correction_kl:  # TRL's default: its KL times the importance ratio (DeepSeek-V3.2)
            change = change * self.importance_ratio(logprobs, inputs, mask)
        loss = loss + self.beta * self.token_aggregate(change, mask, inputs)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["kl_prioritized"].append(kl.masked_mean(prioritized.detach(), mask).item())
        return loss

    def importance_ratio(self, logprobs, inputs, mask):
        """pi / pi_old as TRL's ``_compute_loss`` computes it (with gradient): per token, or one per
        sequence (the exp of the mean log-ratio) with ``importance_sampling_level='sequence'``."""
        old_logprobs = inputs.get("old_per_token_logps")
        log_ratio = logprobs - (logprobs.detach() if old_logprobs is None else old_logprobs)  # (B, T)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
        return torch.exp(log_ratio)

    def token_aggregate(self, per_token, mask, inputs):
        """A per-token loss term aggregated as TRL's ``_compute_loss`` aggregates its own for this
        ``loss_type`` (normalisation and gradient-accumulation scaling included): the change of TRL's
        loss when each token's term changes by ``per_token``. per_token, mask: (B, T)."""
        train = self.model.training
        accumulation = self.current_gradient_accumulation_steps if train else 1.0
        total = per_token * mask  # (B, T)
        if self.loss_type in ("grpo", "sapo"):
            return (total.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return total.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return total.sum() / (total.size(0) * self.max_completion_length) / accumulation
        if self.loss_type in ("dapo", "cispo", "vespo"):
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return total.sum() / normalizer
        if self.loss_type == "luspo":
            return total.sum(-1).mean() / accumulation
        raise ValueError(f"loss_type {self.loss_type!r} is not supported; choose one of {', '.join(LOSS_TYPES)}")

