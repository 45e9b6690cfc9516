"""GPT-2 presets, context lengths, and the reduced-vocabulary GPT-2 initialisation (docs/method.md section 3)."""

import json

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from critical_tokens import cli
from critical_tokens.addition import completion, max_completion_length, prompt
from critical_tokens.model import (
    PRESETS,
    RL_SLACK,
    build_model,
    check_fits,
    context_length,
    count_parameters,
    gpt2_reduced_vocab,
    load_model,
    preset,
)
from critical_tokens.runs import UserError
from critical_tokens.tokenizer import CHARACTERS, EOS_TOKEN, encode

# --- presets and context lengths ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["micro", "tiny"])
def test_small_presets_build_and_run(tokenizer, name):
    torch.manual_seed(0)
    model = build_model(name, tokenizer, n_digits=2)
    p = PRESETS[name]
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (p.n_layer, p.n_head, p.n_embd)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.n_positions == context_length(2)
    assert model.config.pad_token_id == tokenizer.pad_token_id and model.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([encode(tokenizer, prompt(12, 3))])  # (1, T)
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_paper_preset_is_about_85M_parameters(tokenizer):
    # GPT-2 small (124M) without its 50,257 x 768 token embedding; built on the meta device (no memory).
    with torch.device("meta"):
        model = build_model("paper", tokenizer, n_digits=7)
    n = count_parameters(model)
    assert 84e6 < n < 87e6, n
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (12, 12, 768)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 9, 11, 13, 20])
def test_context_length_fits_evaluation_and_rl(n):
    largest = 10 ** (n + 3) - 1
    eval_len = len(prompt(largest, largest)) + len(completion(largest, largest)) + 1  # + end-of-text
    rl_len = len(prompt(largest, largest)) + max_completion_length(n + 2) + RL_SLACK + 1
    assert context_length(n) >= max(eval_len, rl_len)
    assert context_length(n) % 64 == 0


def test_unknown_preset_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="huge"):
        preset("huge")
    with pytest.raises(UserError, match="huge"):
        build_model("huge", tokenizer, n_digits=2)


def test_check_fits_refuses_too_long_sequences(tokenizer):
    model = build_model("micro", tokenizer, n_digits=1)
    check_fits(model, model.config.n_positions)  # exactly the context: fine
    with pytest.raises(UserError, match="does not fit"):
        check_fits(model, model.config.n_positions + 1)


def test_load_model_of_a_missing_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        load_model(tmp_path / "nothing")


# --- GPT-2 with the vocabulary reduced to characters ------------------------------------------------


def gpt2_byte_token(ch: str) -> str:
    """GPT-2's byte-level token for an ASCII character: printable ones spell themselves, bytes 0..32
    are shifted to chr(256 + byte) ("\\n" -> "Ċ", " " -> "Ġ"), as in GPT-2's ``bytes_to_unicode``."""
    assert ord(ch) < 127
    return chr(256 + ord(ch)) if ord(ch) <= 32 else ch


@pytest.fixture(scope="module")
def gpt2_source(tmp_path_factory):
    """A small GPT-2 checkpoint and byte-level BPE tokenizer, made locally (no hub download)."""
    bpe = ByteLevelBPETokenizer()
    text = [CHARACTERS, prompt(123, 45) + completion(123, 45), "the quick brown fox jumps over the lazy dog"]
    bpe.train_from_iterator(text, vocab_size=400, min_frequency=1, special_tokens=[EOS_TOKEN])
    source_tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS_TOKEN)
    eos = source_tokenizer.eos_token_id
    torch.manual_seed(0)
    # 512 positions: enough for 2-digit additions in the end-to-end pre-training test below.
    config = GPT2Config(vocab_size=len(source_tokenizer), n_layer=2, n_head=2, n_embd=32, n_positions=512,
                        bos_token_id=eos, eos_token_id=eos)
    source_model = GPT2LMHeadModel(config)
    path = tmp_path_factory.mktemp("gpt2_source")
    source_model.save_pretrained(path)
    source_tokenizer.save_pretrained(path)
    return path, source_model, source_tokenizer


def test_gpt2_reduced_vocab_keeps_character_rows_and_blocks(tokenizer, gpt2_source):
    path, source_model, source_tokenizer = gpt2_source
    model = gpt2_reduced_vocab(str(path), tokenizer)

    assert model.config.vocab_size == len(tokenizer)
    wte = model.get_input_embeddings().weight  # (len(tokenizer), D)
    source_wte = source_model.get_input_embeddings().weight
    assert wte.shape == (len(tokenizer), source_wte.shape[1])
    for ch in CHARACTERS:
        source_id = source_tokenizer.convert_tokens_to_ids(gpt2_byte_token(ch))
        assert source_id is not None and source_id != source_tokenizer.unk_token_id
        assert torch.equal(wte[tokenizer.convert_tokens_to_ids(ch)], source_wte[source_id]), repr(ch)
    assert torch.equal(wte[tokenizer.eos_token_id], source_wte[source_tokenizer.eos_token_id])
    torch.testing.assert_close(wte[tokenizer.pad_token_id], source_wte.mean(0))
    assert torch.equal(model.lm_head.weight, wte)  # output embedding tied to the input one

    source_state = source_model.state_dict()
    kept = [k for k in model.state_dict() if not k.endswith(("wte.weight", "lm_head.weight"))]
    assert any(".h.1." in k for k in kept) and any("wpe" in k for k in kept)
    for key in kept:
        assert torch.equal(model.state_dict()[key], source_state[key]), key
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id

    ids = torch.tensor([encode(tokenizer, prompt(12, 34))])  # (1, T)
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_gpt2_reduced_vocab_of_a_missing_source_is_a_user_error(tokenizer, tmp_path):
    with pytest.raises(UserError, match="cannot load GPT-2"):
        gpt2_reduced_vocab(str(tmp_path / "nothing"), tokenizer)


def test_pretrain_from_gpt2_end_to_end(gpt2_source, tmp_path):
    path, source_model, _ = gpt2_source
    out = tmp_path / "run"
    rc = cli.main(["pretrain", "--out", str(out), "--init", "gpt2", "--gpt2-source", str(path),
                   "--preset", "micro", "--n-digits", "2", "--examples-per-length", "16", "--batch-size", "8",
                   "--eval-every", "100", "--eval-examples", "2", "--checkpoint-every", "100"])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["init"] == "gpt2" and config["total_steps"] == 4
    model = load_model(out / "model")
    assert model.config.vocab_size == config["vocab_size"]
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (2, 32, 512)
    assert model.config.critical_tokens_n_digits == 2
    # it trained: the blocks moved away from the GPT-2 weights they started from
    key = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(model.state_dict()[key], source_model.state_dict()[key])
