"""One token per character, as a standard Hugging Face ``PreTrainedTokenizerFast``.

The vocabulary is exactly the characters of the scratchpad format (docs/method.md section 1) plus an
end-of-text and a padding token. There is deliberately no ``<unk>``: encoding a character outside
the vocabulary raises ``ValueError`` naming it, instead of silently mapping it to an unknown token.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# Digits, the scratchpad's symbols, space, newline, and the letters of "Input: Target: scratch END A C".
CHARACTERS = "0123456789[],+=-></: \n" + "".join(sorted(set("InputTargetscratchENDAC")))
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {ch: i for i, ch in enumerate(CHARACTERS)}
    vocab[EOS_TOKEN] = len(vocab)
    vocab[PAD_TOKEN] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab))  # no unk_token: unknown characters fail loudly
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join back without separators
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",  # prompts are left-padded for batched generation
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(path))


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of ``text``, one per character; ``ValueError`` on a character not in the vocabulary."""
    try:
        return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    except Exception:
        vocab = tokenizer.get_vocab()
        bad = sorted({ch for ch in text if ch not in vocab})
        raise ValueError(f"characters not in the vocabulary: {bad!r}") from None


def decode(tokenizer: PreTrainedTokenizerFast, ids) -> str:
    """Text of ``ids`` with padding and end-of-text removed."""
    return tokenizer.decode(ids, skip_special_tokens=True)
