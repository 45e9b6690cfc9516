"""GPT-2 presets (``transformers.GPT2LMHeadModel``), the reduced-vocabulary GPT-2 initialisation,
and loading/saving models in the standard Hugging Face format.

Presets fix the shape of the network; the context length is derived from the number of digits the
model is pre-trained on so that additions of up to N+3 digits (evaluation) and an RL episode on
N+2 digits plus the 100-character slack of docs/method.md section 4 always fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from . import addition
from .attention import use_causal_blocks
from .runs import UserError, describe_kind, run_kind
from .tokenizer import load_tokenizer


@dataclass(frozen=True)
class Preset:
    n_layer: int
    n_head: int
    n_embd: int
    meant_for_n_digits: int  # the N the preset is sized for (documentation and defaults)


PRESETS: dict[str, Preset] = {
    "micro": Preset(n_layer=2, n_head=2, n_embd=32, meant_for_n_digits=2),  # tests: trains in seconds
    "tiny": Preset(n_layer=4, n_head=4, n_embd=128, meant_for_n_digits=5),  # ~0.9M parameters
    "small": Preset(n_layer=6, n_head=8, n_embd=256, meant_for_n_digits=7),  # ~5.0M parameters
    "medium": Preset(n_layer=6, n_head=6, n_embd=384, meant_for_n_digits=7),  # Lee et al.'s nanoGPT size
    "paper": Preset(n_layer=12, n_head=12, n_embd=768, meant_for_n_digits=7),  # ~85M, the paper's
}

RL_SLACK = 100  # docs/method.md section 4: an episode may run 100 characters past the longest completion
# No dropout: the task is synthetic and unlimited, and RL needs the policy's log-probs at rollout and
# update time to be the same function.
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def max_sequence_length(n_digits: int) -> int:
    """Longest prompt + completion the model must handle when pre-trained on ``n_digits``."""
    longest_prompt = len(addition.prompt(10 ** (n_digits + 3) - 1, 10 ** (n_digits + 3) - 1))
    eval_len = longest_prompt + addition.max_completion_length(n_digits + 3)
    rl_len = longest_prompt + addition.max_completion_length(n_digits + 2) + RL_SLACK
    return max(eval_len, rl_len) + 1  # + end-of-text


def context_length(n_digits: int) -> int:
    return 64 * math.ceil(max_sequence_length(n_digits) / 64)


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_model(preset_name: str, tokenizer: PreTrainedTokenizerFast, n_digits: int) -> GPT2LMHeadModel:
    """A fresh GPT-2 (learned positions, pre-LayerNorm, GELU MLP) with the character vocabulary."""
    p = preset(preset_name)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=context_length(n_digits),
        n_embd=p.n_embd,
        n_layer=p.n_layer,
        n_head=p.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        activation_function="gelu_pytorch_tanh",  # GPT-2's tanh GELU as one fused kernel (same function)
        **NO_DROPOUT,
    )
    return use_causal_blocks(causal_lm_loss(GPT2LMHeadModel(config)))


def causal_lm_loss(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Names the model's loss, the next-token cross-entropy. transformers infers it from the class
    name, which "GPT2LMHeadModel" does not match, and warns "`loss_type=None` ... Using the default
    loss: `ForCausalLMLoss`" at the first loss of every pre-training; that default is the right one."""
    model.loss_type = "ForCausalLM"
    return model


def gpt2_reduced_vocab(source: str, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """Pre-trained GPT-2 with its vocabulary cut down to our characters (docs/method.md section 3).

    ``source`` is a hub name (``gpt2``) or a local directory holding a GPT-2 model and its tokenizer.
    Each of our characters keeps the embedding row of GPT-2's token for that single character
    (GPT-2's byte-level BPE has one for every byte); end-of-text keeps ``<|endoftext|>``; padding
    gets the mean embedding. Positions and all transformer weights are kept as they are.
    """
    try:
        source_tokenizer = AutoTokenizer.from_pretrained(source)
        source_model = AutoModelForCausalLM.from_pretrained(source)
    except OSError as e:
        raise UserError(f"cannot load GPT-2 from {source!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(source_model, GPT2LMHeadModel):
        raise UserError(f"{source!r} is a {type(source_model).__name__}, not a GPT-2 model")
    old = source_model.get_input_embeddings().weight.detach()  # (V_old, D)
    rows = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token == tokenizer.pad_token:
            rows.append(old.mean(dim=0))
            continue
        text = source_tokenizer.eos_token if token == tokenizer.eos_token else token
        ids = source_tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise UserError(f"{source!r}: character {token!r} is not a single token in its vocabulary")
        rows.append(old[ids[0]])
    config = source_model.config
    config.vocab_size = len(tokenizer)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    for k, v in NO_DROPOUT.items():
        setattr(config, k, v)
    model = GPT2LMHeadModel(config)
    state = {k: v for k, v in source_model.state_dict().items() if not k.endswith(("wte.weight", "lm_head.weight"))}
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.stack(rows))
    model.tie_weights()
    return use_causal_blocks(causal_lm_loss(model))


def load_model(path: str | Path) -> GPT2LMHeadModel:
    path = Path(path)
    try:
        # float32 whatever the file holds: a checkpoint shipped in half precision is computed in float32.
        return use_causal_blocks(causal_lm_loss(GPT2LMHeadModel.from_pretrained(str(path), dtype=torch.float32)))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # SafetensorError: a corrupt weights file
        raise UserError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None


def load_pretrained(run_dir: str | Path, n_digits: int | None = None, kinds: tuple[str, ...] = ("pretrain", "rl")):
    """(model, tokenizer, N) of a pre-training run; ``n_digits`` overrides N (needed when unknown).
    Any run of ``kinds`` or model directory will do; another kind of run is a UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    kind = run_kind(run_dir)
    if kind == "reproduction":
        raise UserError(f"{run_dir} is a reproduction, not a run with a model; give one of its runs, such as {run_dir / 'pretrain'}/<model>")
    if kind not in (*kinds, "model", None):
        raise UserError(f"{run_dir} is {describe_kind(kind)}; give " + " or ".join(describe_kind(k) for k in kinds))
    model_dir = run_dir / "model" if (run_dir / "model").is_dir() else run_dir
    if not (model_dir / "config.json").exists():
        raise UserError(f"{run_dir} holds no checkpoint (expected {run_dir}/model/config.json)")
    model = load_model(model_dir)
    try:
        tokenizer = load_tokenizer(model_dir)
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise UserError(f"cannot load the tokenizer in {model_dir}: {str(e).splitlines()[0]}") from None
    n = n_digits if n_digits is not None else getattr(model.config, "critical_tokens_n_digits", None)
    if n is None:
        raise UserError(f"{run_dir}: the number of digits it was pre-trained on is unknown; pass --n-digits")
    return model, tokenizer, int(n)


def pick_device(name: str) -> torch.device:
    """The device of ``--device``; a GPU's float32 matmuls then run on tensor cores (TF32)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no GPU is available")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return device


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_context(config) -> int | None:
    """The positions a causal LM can take: GPT-2's ``n_positions``, or ``max_position_embeddings`` (Llama,
    Qwen2, ...); None when its config states neither."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_fits(model, length: int) -> None:
    context = model_context(model.config)
    if context is not None and length > context:
        raise UserError(
            f"a sequence of {length} tokens does not fit the model's context of {context}"
            " positions; use fewer digits or a model pre-trained on more"
        )
