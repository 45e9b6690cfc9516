"""The prioritized KL penalty in TRL's ``GRPOTrainer`` and ``RLOOTrainer``: configs and trainers, for any Hugging Face causal LM.

    from critical_tokens.trl import PrioritizedGRPOConfig, PrioritizedGRPOTrainer

    args = PrioritizedGRPOConfig(output_dir="out", kl_coef=0.04, prioritized_beta=150)  # kl_coef: TRL's beta
    trainer = PrioritizedGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset)
    trainer.train()

The paper's eq. 1 (Vassoyan, Beau, Plaud, "Ignore the KL Penalty! Boosting Exploration on Critical Tokens
to Enhance RL Fine-Tuning", NAACL Findings 2025) weights each completion token's KL estimate k_t by

    w_t = c(s_t) ** prioritized_beta        (kl.prioritized_weights)
    c(s_t) = the reference model's certainty in the state of token t (kl.certainty, eq. 2 by default)
    k_t = kl.kl_estimate(logprobs, ref_logprobs, kl_estimator)

so the policy may move freely on the tokens where the reference model was unsure ("critical" tokens)
and is held to it where the reference was confident. ``prioritized_beta=0`` gives TRL's own KL.
``kl_weights=`` takes any other rule of the weights w_t (critical_tokens.kl_rules: ``uniform(scale)``,
``ignore_tokens([...])``, ``entropy_quantile(q)``, a function, and their products); ``prioritized_beta=B``
is ``kl_weights=prioritized(B)``, the default.

The KL coefficient is ``kl_coef`` (beta is the exponent), handed to TRL as its ``beta`` (also taken).

- GRPO: TRL adds ``kl_coef * k3_t`` to the loss of every completion token. :class:`PrioritizedGRPOTrainer`
  makes that term ``kl_coef * w_t * k_t`` (k: TRL's k3 by default; the paper: k2).
- RLOO: TRL subtracts ``kl_coef * sum_t k1_t`` from each completion's reward, before the leave-one-out
  baseline. :class:`PrioritizedRLOOTrainer` subtracts ``kl_coef * sum_t w_t * k_t`` (k: TRL's k1 by default).

Everything else is TRL's: its reference model, generation, rewards, advantages, loss type and logging.
Only the reference pass changes: it runs the reference once, and from its logits at the completion
positions takes both TRL's reference log-probs and the statistics the rule needs, the certainty (and the
entropy for ``entropy_quantile``; no extra forward pass). A rule that needs neither (uniform,
ignore_tokens) keeps TRL's own reference pass. Like TRL's fused
log-prob head it never holds the (B, T, V) logits: it applies the LM head to a chunk of positions at a time
and keeps only that chunk's log-probs and certainties. The weight statistics are logged with TRL's metrics
(``kl_weight/mean``, ``kl_weight/q05``, ...). With several processes (``accelerate launch --multi_gpu``,
``torchrun``; on CPUs too, with gloo) the statistics, the ``'auto'`` beta and the entropy quantile are over
the completion tokens of all processes, so every process uses the same beta and threshold.

LoRA and other PEFT adapters work as in TRL: pass ``peft_config=LoraConfig(...)`` (or a ``PeftModel``) to
the trainer. TRL then keeps no reference model: its reference is the policy with the adapters disabled
(the base model), or, for a ``PeftModel`` whose adapter TRL copies at the start, that copy (adapter "ref").
The prioritized reference pass runs in the same state TRL puts the model in, so c(s) is the base
model's certainty.

Requires the ``trl`` extra: ``pip install -e ".[trl]"`` from a clone (``peft`` is part of it); written
and tested against TRL 1.16, and refuses other TRL versions at import with the command that fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
import trl
from accelerate.utils import is_peft_model
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

# The trainers override TRL's reference pass, a private part of its trainers that changes between
# minor releases: refuse other versions here, with the fix, rather than fail deep inside a step.
TESTED_TRL = "1.16"
if ".".join(trl.__version__.split(".")[:2]) != TESTED_TRL:
    raise ImportError(f"critical_tokens.trl is written and tested against TRL {TESTED_TRL}.x (it overrides TRL's reference pass); "
                      f"found TRL {trl.__version__}: pip install 'trl>={TESTED_TRL},<1.17'")

from . import checks, kl, kl_rules
from .policy import token_logprobs, token_logprobs_and_entropy

# TRL's GRPO loss types whose aggregation of per-token terms `token_aggregate` reproduces.
LOSS_TYPES = ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo")

# The reference pass holds the reference's logits for one chunk of completion positions at a time: as many
# positions as make a chunk of about this many logits (2^24: 64 MB in float32; a few such buffers live at
# once). TRL's fused log-prob head on a CPU holds tiles of up to 4096 tokens x 32768 vocabulary entries.
REFERENCE_CHUNK_ELEMENTS = 2**24
DEFAULT_PRIORITIZED_BETA = 150.0  # the paper's


def _logit_transform(config):
    """(logit_scale, final_logit_softcapping) of a causal LM's logits after its LM head, found in its config
    as TRL's ``add_fused_lm_head`` finds them (TRL 1.16), so that the reference pass, which applies the LM
    head itself, gives the logits of the model's own forward."""
    text_config = config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), softcap


# --- the options, shared by both configs -------------------------------------------------------------
@dataclass
class PrioritizedKLOptions:
    """The prioritized KL penalty's options, mixed into a TRL config (``PrioritizedGRPOConfig``,
    ``PrioritizedRLOOConfig``) and checked after TRL's own ``__post_init__``. ``kl_coef`` is the KL
    coefficient (0 disables the KL and the reference model, as in TRL), handed to TRL as its ``beta``;
    ``beta=`` (TRL's name) is taken as well, and after ``__post_init__`` both hold the coefficient."""

    kl_coef: float | None = field(default=None, metadata={"help": "the KL coefficient (the paper's alpha), handed to TRL as its beta; default: beta (TRL's name for it, and its default)"})

    prioritized_beta: float | str = field(default=DEFAULT_PRIORITIZED_BETA, metadata={"help": "exponent of the KL weights w = c^prioritized_beta (the paper: 150; 0: TRL's standard KL), or 'auto': calibrated on the reference's certainty over the first batch of all processes (kl.calibrate_beta); the rule prioritized(prioritized_beta) when kl_weights is not given"})
    certainty: str = field(default="max_prob", metadata={"help": "certainty c(s) of the reference: 'max_prob' (the paper's eq. 2) or 'negentropy' (eq. 1)"})
    certainty_temperature: float = field(default=4.0, metadata={"help": "temperature of the reference distribution in c(s) (the paper: 4)"})
    kl_estimator: str = field(default="k3", metadata={"help": "Schulman's KL estimator weighted by w: 'k3' (TRL's GRPO), 'k2' (the paper's) or 'k1'"})
    auto_beta_quantile: float = field(default=0.05, metadata={"help": "prioritized_beta='auto': the certainty quantile whose weight is auto_beta_weight"})
    auto_beta_weight: float = field(default=0.5, metadata={"help": "prioritized_beta='auto': the weight at that quantile"})
    kl_weights: str | None = field(default=None, metadata={"help": "the rule of the per-token KL weights (critical_tokens.kl_rules): a kl_rules.Rule such as prioritized(8) * ignore_tokens(['<|im_end|>']), uniform(0.1), entropy_quantile(0.2) or a function, or its text ('prioritized:8*ignore:<|im_end|>'); default: prioritized(prioritized_beta)"})

    def __post_init__(self):
        if self.kl_coef is not None:  # the project's name; TRL's trainers read the coefficient as args.beta
            trl_default = next(f.default for f in fields(self) if f.name == "beta")
            if self.beta not in (trl_default, self.kl_coef):
                raise ValueError(f"give the KL coefficient once: kl_coef={self.kl_coef} or beta={self.beta} (TRL's name for it), not both")
            self.beta = self.kl_coef
        super().__post_init__()
        checks.in_range("beta" if self.kl_coef is None else "kl_coef", self.beta, 0)  # TRL takes NaN and turns every weight into NaN
        self.kl_coef = self.beta
        if self.kl_weights is not None and self.prioritized_beta != DEFAULT_PRIORITIZED_BETA:
            raise ValueError(f"give the KL weights once: kl_weights={self.kl_weights!s} or prioritized_beta={self.prioritized_beta}, not both")
        beta = checks.parse_beta("prioritized_beta", self.prioritized_beta)
        self.prioritized_beta = "auto" if beta is None else beta
        if self.certainty not in kl.CERTAINTY_METHODS:
            raise ValueError(f"certainty must be one of {', '.join(kl.CERTAINTY_METHODS)}, got {self.certainty!r}")
        if self.kl_estimator not in kl.ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(kl.ESTIMATORS)}, got {self.kl_estimator!r}")
        checks.in_range("certainty_temperature", self.certainty_temperature, 0, low_open=True)
        checks.quantile_and_weight("auto_beta_quantile", self.auto_beta_quantile, "auto_beta_weight", self.auto_beta_weight)
        self.kl_weights = kl_rules.prioritized(self.prioritized_beta) if self.kl_weights is None else kl_rules.as_rule(self.kl_weights)

    def to_dict(self):
        """TRL's JSON form of the config, with the rule as its text."""
        return {**super().to_dict(), "kl_weights": str(self.kl_weights)}


@dataclass
class PrioritizedGRPOConfig(PrioritizedKLOptions, GRPOConfig):
    """``GRPOConfig`` plus the prioritized KL penalty's options (:class:`PrioritizedKLOptions`; the KL
    estimator defaults to TRL's k3)."""

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not supported; choose one of {', '.join(LOSS_TYPES)}")


@dataclass
class PrioritizedRLOOConfig(PrioritizedKLOptions, RLOOConfig):
    """``RLOOConfig`` plus the prioritized KL penalty's options (:class:`PrioritizedKLOptions`; the KL
    estimator defaults to TRL's RLOO one, k1 = log pi - log pi_ref)."""

    kl_estimator: str = field(default="k1", metadata={"help": "Schulman's KL estimator weighted by w and summed into the reward: 'k1' (TRL's RLOO), 'k2' (the paper's) or 'k3'"})


# --- what both trainers share: the reference pass and the weights -----------------------------------
class _PrioritizedKLMixin:
    """The parts of the prioritized KL penalty that do not depend on where TRL puts its KL: telling
    TRL's reference pass from its policy passes (also with PEFT adapters), computing the reference's
    log-probs and certainty from one forward pass, and turning the certainty into weights (with
    ``prioritized_beta='auto'`` calibrated on the first batch) and metrics. Mixed in before a TRL trainer,
    whose ``_get_per_token_logps_and_entropies`` it overrides."""

    _config_class: type = PrioritizedKLOptions
    # Completion positions per chunk of the reference's logits (None: REFERENCE_CHUNK_ELEMENTS logits per chunk).
    reference_chunk_size: int | None = None

    def _setup_prioritized_kl(self):
        """Called at the end of ``__init__``, after TRL's."""
        if not isinstance(self.args, self._config_class):
            raise TypeError(f"args must be a {self._config_class.__name__}, got {type(self.args).__name__}")
        self._tuner_layers = []  # PEFT's adapter layers, whose state says whether TRL is in its reference pass
        if self.args.kl_coef != 0.0 and self.ref_model is None:
            model = self.accelerator.unwrap_model(self.model)
            if not is_peft_model(model):  # TRL keeps a reference model unless the policy has PEFT adapters
                raise ValueError("the prioritized KL penalty needs TRL's reference model, or a policy with PEFT adapters")
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
            if not self._tuner_layers:  # prompt learning (prefix tuning, ...) disables its adapter by swapping forward
                raise NotImplementedError("the prioritized KL penalty supports PEFT adapters with adapter layers (LoRA, ...), not prompt learning")
        # The rule of the weights, its token texts turned into ids; a beta 'auto' is calibrated on the first batch.
        self.kl_rule = self.args.kl_weights.bind(self.processing_class)
        self._policy_logprobs = None  # (B, T) of the last policy pass
        self._policy_input_ids = None  # the input_ids tensor of that pass
        self._ref_stats = kl_rules.ReferenceStats()  # (B, T) statistics of the last reference pass

    @property
    def prioritized_beta(self) -> float | None:
        """The exponent of the rule's prioritized factor (None: none, or 'auto' not yet calibrated)."""
        return self.kl_rule.beta

    @property
    def _ref_certainty(self):  # (B, T) of the last reference pass
        return self._ref_stats.certainty

    def _is_reference_pass(self, model) -> bool:
        """Whether TRL is calling ``_get_per_token_logps_and_entropies`` for its reference log-probs: on
        its reference model; or, with PEFT (no reference model), on the policy with its adapters disabled
        (``model.disable_adapter()``) or its adapter "ref" active, the states TRL's ``use_adapter`` sets."""
        if self.args.kl_coef == 0.0:
            return False
        if self.ref_model is not None:
            return model is self.ref_model
        peft_model = self.accelerator.unwrap_model(model)
        if not is_peft_model(peft_model):
            return False
        if "ref" in peft_model.peft_config:
            return peft_model.active_adapter == "ref"
        return all(layer.disable_adapters for layer in self._tuner_layers)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs):
        if self._is_reference_pass(model):
            return self._reference_pass(model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)
        logprobs, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)
        self._policy_logprobs, self._policy_input_ids = logprobs, input_ids
        return logprobs, entropies, aux_loss

    def _reference_pass(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs):
        """In place of TRL's reference pass: returns what TRL takes as the reference log-probs, as
        ``(ref_logprobs (B, T), None, None)``. Each trainer defines it (GRPO: the reference's log-probs,
        the certainty kept for the weights; RLOO: log-probs that carry the weights into the reward)."""
        raise NotImplementedError

    @torch.no_grad()
    def _reference_logprobs_and_stats(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                      needs=frozenset({"certainty"}), **kwargs):
        """The reference's log-probs of the completion tokens at TRL's temperature (what TRL computes)
        and the statistics ``needs`` lists (kl_rules.ReferenceStats: the certainty c(s) at
        ``certainty_temperature``, the entropy at TRL's temperature), from one forward pass; (B, T) each.
        ``model`` is in the state TRL put it in for its reference pass (adapters disabled, with PEFT).
        Without statistics to compute, TRL's own reference pass gives the log-probs.

        Like TRL's fused log-prob head, it never holds the (B, T, V) logits: the backbone runs once per
        batch of ``batch_size`` sequences, then the LM head, the temperature, the log-softmax and the
        certainty run on chunks of ``reference_chunk_size`` completion positions, of which only the
        (b, chunk) results are kept (the same numbers as from the whole logits, up to float rounding)."""
        if not needs:
            ref_logprobs = super(_PrioritizedKLMixin, self)._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)[0]
            return ref_logprobs, kl_rules.ReferenceStats()
        if any(value is not None for value in kwargs.values()):
            raise NotImplementedError("the prioritized KL penalty supports text-only models")
        lm = self.accelerator.unwrap_model(model)
        if is_peft_model(lm):  # LoRA's layers sit inside the base model, in the state TRL set
            lm = lm.get_base_model()
        backbone, head = lm.base_model, lm.get_output_embeddings()  # as TRL's fused head finds them
        head_weight = head.weight
        vocab_size = head_weight.shape[0]
        logit_scale, softcap = _logit_transform(lm.config)
        fp32_head = getattr(self.args, "cast_lm_head_to_fp32", False)
        batch_size = batch_size or input_ids.size(0)
        ref_logprobs, stats = [], {name: [] for name in needs}
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            with self.accelerator.autocast():
                hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            # (b, T, H): the state before completion token t predicts it
            hidden = hidden[:, -logits_to_keep - 1 : -1].to(head_weight.device)
            tokens = ids[:, -logits_to_keep:].to(head_weight.device)
            chunk = self.reference_chunk_size or max(1, REFERENCE_CHUNK_ELEMENTS // (ids.size(0) * vocab_size))
            logprobs_chunks, stats_chunks = [], {name: [] for name in needs}
            for t in range(0, logits_to_keep, chunk):
                h = hidden[:, t : t + chunk]  # (b, chunk, H)
                if fp32_head:  # TRL's cast_lm_head_to_fp32: the projection in float32, outside autocast
                    bias = getattr(head, "bias", None)
                    with torch.autocast(h.device.type, enabled=False):
                        logits = torch.nn.functional.linear(h.float(), head_weight.float(), None if bias is None else bias.float())
                else:
                    with self.accelerator.autocast():
                        logits = head(h)
                logits = logits.float() * logit_scale if logit_scale != 1.0 else logits.float()  # (b, chunk, V)
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
                if "entropy" in needs:  # one log-softmax for the log-probs and the entropy, both at TRL's temperature
                    taken, entropy = token_logprobs_and_entropy(logits / self.temperature, tokens[:, t : t + chunk])  # (b, chunk) each
                    stats_chunks["entropy"].append(entropy)
                else:
                    taken = token_logprobs(logits / self.temperature, tokens[:, t : t + chunk])  # (b, chunk)
                logprobs_chunks.append(taken)
                if "certainty" in needs:
                    stats_chunks["certainty"].append(kl.certainty(logits, self.args.certainty, self.args.certainty_temperature))
                del logits  # free this chunk's logits before the next one's
            del hidden
            ref_logprobs.append(torch.cat(logprobs_chunks, 1))  # (b, T)
            for name, chunks in stats_chunks.items():
                stats[name].append(torch.cat(chunks, 1))
        return torch.cat(ref_logprobs), kl_rules.ReferenceStats(**{name: torch.cat(parts) for name, parts in stats.items()})

    def _kl_weights(self, stats, token_ids, mask):
        """The rule's weights w (B, T) from the reference's statistics, the completion's token ids and its
        mask (B, T) bool; calibrates a beta 'auto' not yet calibrated, and logs the weights' statistics.
        With several processes, the beta, the batch statistics a rule takes (entropy quantile) and the
        logged ones are over the completion tokens of all of them (every process calls this at the same
        point of a step): every process calibrates the same beta."""
        stats = replace(stats, gather=self._gather_tokens)
        if self.kl_rule.needs_calibration:  # 'auto': calibrated once, on the first batch of every process
            certainty = self._gather_tokens(stats.certainty[mask])  # (N,)
            self.kl_rule = self.kl_rule.calibrated(certainty, self.args.auto_beta_quantile, self.args.auto_beta_weight)
        weights = self.kl_rule(stats, token_ids, mask)  # (B, T)
        mode = "train" if self.model.training else "eval"
        w = self._gather_tokens(weights[mask])  # (N,): every process's completion tokens
        if w.numel():
            for name, value in (("kl_weight/mean", w.mean()), ("kl_weight/q05", torch.quantile(w, 0.05)),
                                ("kl_weight/q50", torch.quantile(w, 0.5))):
                self._metrics[mode][name].append(value.item())
        if stats.certainty is not None:
            self._metrics[mode]["certainty/mean"].append(self._global_masked_mean(stats.certainty, mask))
        if self.prioritized_beta is not None:
            self._metrics[mode]["prioritized_beta"].append(self.prioritized_beta)
        return weights

    def _gather_tokens(self, values):
        """The 1-D ``values`` (a varying number per process) of every process, concatenated in process order;
        ``values`` itself with one process."""
        if self.accelerator.num_processes == 1:
            return values
        values = values.float().contiguous()
        counts = self.accelerator.gather(torch.tensor([values.numel()], device=values.device)).tolist()  # (P,)
        padded = self.accelerator.gather(self.accelerator.pad_across_processes(values, dim=0))  # (P * max count,)
        width = max(counts)
        return torch.cat([padded[i * width : i * width + n] for i, n in enumerate(counts)])

    def _global_masked_mean(self, values, mask) -> float:
        """The mean of ``values`` over the positions where ``mask`` is set, over all processes (as TRL's
        metrics: a sum and a count reduced across processes); 0 when no process has a position."""
        mask = mask.bool()
        local = torch.stack([torch.where(mask, values.float(), 0.0).sum(), mask.sum().float()])
        total = self.accelerator.reduce(local, reduction="sum")
        return (total[0] / total[1].clamp(min=1.0)).item()


# --- GRPO: the weights in the loss --------------------------------------------------------------------
class PrioritizedGRPOTrainer(_PrioritizedKLMixin, GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose per-token KL term ``kl_coef * k3`` in the loss becomes ``kl_coef * w * k``
    (module docstring). Takes a :class:`PrioritizedGRPOConfig` as ``args``; otherwise as ``GRPOTrainer``,
    ``peft_config`` included."""

    _config_class = PrioritizedGRPOConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_prioritized_kl()

    # --- the reference pass: TRL's log-probs and the certainty from the same logits -----------------
    def _reference_pass(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs):
        ref_logprobs, self._ref_stats = self._reference_logprobs_and_stats(
            model, input_ids, attention_mask, logits_to_keep, batch_size, self.kl_rule.needs, **kwargs)
        return ref_logprobs, None, None

    # --- the KL weights, once per generation batch ---------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.kl_coef != 0.0:
            output["kl_weights"] = self._kl_weights(self._ref_stats, output["completion_ids"], output["completion_mask"].bool())  # (B, T)
        return output

    # --- the loss: TRL's, with kl_coef * w * k in place of kl_coef * k3 ------------------------------
    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)  # TRL's loss, kl_coef * k3 on every token included
        if self.args.kl_coef == 0.0:
            return loss
        logprobs, ref_logprobs = self._policy_logprobs, inputs["ref_per_token_logps"]  # (B, T), set by the pass TRL just ran
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        # The paper's eq. 1 in place of TRL's term: add kl_coef * (w * k - k3) to each token's loss. (TRL writes
        # k3 as exp(d) - d - 1, kl.kl_estimate as expm1(d) - d: the same function up to float32 rounding.)
        prioritized = inputs["kl_weights"] * kl.kl_estimate(logprobs, ref_logprobs, self.args.kl_estimator)  # (B, T)
        standard = kl.kl_estimate(logprobs, ref_logprobs, "k3")  # (B, T)
        change = prioritized - standard  # (B, T)
        if self.args.use_bias_correction_kl:  # TRL's default: its KL times the importance ratio (DeepSeek-V3.2)
            change = change * self.importance_ratio(logprobs, inputs, mask)
        loss = loss + self.args.kl_coef * self.token_aggregate(change, mask, inputs)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["kl_prioritized"].append(self._global_masked_mean(prioritized.detach(), mask))
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


# --- RLOO: the weights in the reward ------------------------------------------------------------------
class PrioritizedRLOOTrainer(_PrioritizedKLMixin, RLOOTrainer):
    """TRL's ``RLOOTrainer`` whose KL penalty in the reward, ``kl_coef * sum_t k1_t``, becomes
    ``kl_coef * sum_t w_t * k_t`` (module docstring). Takes a :class:`PrioritizedRLOOConfig` as ``args``;
    otherwise as ``RLOOTrainer``, ``peft_config`` included.

    How: in ``_generate_and_score_completions`` TRL computes the policy's log-probs ``old`` (no gradient),
    then the reference's ``ref``, and subtracts ``kl_coef * sum_t (old_t - ref_t)`` over the completion
    tokens from the reward; ``ref`` is used for nothing else. Our reference pass returns
    ``old - w * k`` in place of ``ref``, so that TRL's ``old_t - ref_t`` is ``w_t * k_t``, and TRL's
    own code sums it, scales it by ``kl_coef``, takes it out of the reward and computes the leave-one-out
    advantages. TRL's ``kl`` metric is then the weighted KL that entered the reward; ``kl_unweighted``
    logs the mean of k. With weights 1 (``prioritized_beta=0`` or ``kl_weights=uniform(1)``) and
    ``kl_estimator='k1'`` (k = TRL's k1) the reference pass is TRL's own, and the trainer is TRL's RLOO
    exactly (no certainty is computed then)."""

    _config_class = PrioritizedRLOOConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_prioritized_kl()

    def _reference_pass(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs):
        if input_ids is not self._policy_input_ids:  # TRL scores the same batch with the policy just before
            raise RuntimeError("the prioritized RLOO reference pass expects TRL's policy pass on the same batch before it")
        old_logprobs = self._policy_logprobs  # (B, T), no gradient
        mask = attention_mask[:, -logits_to_keep:].bool()  # (B, T): TRL's completion mask
        mode = "train" if self.model.training else "eval"
        if self.kl_rule.constant == 1 and self.args.kl_estimator == "k1":  # w = 1, k = k1: TRL's RLOO, bit for bit
            ref_logprobs, _, _ = super(_PrioritizedKLMixin, self)._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)  # TRL's own reference pass
            self._metrics[mode]["kl_unweighted"].append(self._global_masked_mean(kl.kl_estimate(old_logprobs, ref_logprobs, "k1"), mask))
            if self.prioritized_beta is not None:
                self._metrics[mode]["prioritized_beta"].append(self.prioritized_beta)
            return ref_logprobs, None, None
        ref_logprobs, self._ref_stats = self._reference_logprobs_and_stats(
            model, input_ids, attention_mask, logits_to_keep, batch_size, self.kl_rule.needs, **kwargs)
        weights = self._kl_weights(self._ref_stats, input_ids[:, -logits_to_keep:], mask)  # (B, T)
        estimate = kl.kl_estimate(old_logprobs, ref_logprobs, self.args.kl_estimator)  # (B, T)
        self._metrics[mode]["kl_unweighted"].append(self._global_masked_mean(estimate, mask))
        return old_logprobs.float() - weights * estimate * mask, None, None  # TRL's old - ref is then w * k on the completion
