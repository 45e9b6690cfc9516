"""`critical-tokens inspect`: random-weight GPT-2, Llama and Qwen2 models with a byte-level BPE
tokenizer made here, the shipped checkpoint on additions, and the one-line errors."""

import html
import json
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, BertConfig, BertLMHeadModel, BertModel, DistilBertConfig, GPT2Config,
                          LlamaConfig, PreTrainedTokenizerFast, Qwen2Config)

from critical_tokens import addition, cli
from critical_tokens.runs import PACKAGE_DIR

SHIPPED = PACKAGE_DIR / "checkpoints" / "tiny-n3-d1-lr3e-4"
TEXTS = ["the cat sat on the mat", "Question: what is 2+2?\nAnswer: 4", "héllo wörld <b>&amp;</b>"]
GIVEN = [("Question: what is 3+4?\n", "Answer: 7"), ("the cat", " sat on <b>wörld</b> & héllo")]  # escaping, bytes split over tokens
KEYS = {"sampled_cut_short", "config", "model", "model_class", "certainty_method", "certainty_temperature", "summary", "completions"}
SUMMARY_KEYS = {"tokens", "certainty_mean", "certainty_quantiles", "auto_beta", "beta", "share_weight_below_half"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def page_text(page: str) -> str:
    """What the HTML page shows: tags dropped, entities decoded, newline marks removed."""
    return html.unescape(re.sub(r"<[^>]+>", "", page)).replace("↵", "")


def tiny_config(kind: str, vocab_size: int, eos: int):
    shared = dict(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos)
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **shared)
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=128, **shared)
    return LlamaConfig(**size) if kind == "llama" else Qwen2Config(**size)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE of about 300 tokens, trained on TEXTS."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tokenizer):
    """{architecture: directory} of random-weight causal LMs saved with the tokenizer."""
    torch.manual_seed(0)
    dirs = {}
    for kind in ("gpt2", "llama", "qwen2"):
        dirs[kind] = tmp_path_factory.mktemp("models") / kind
        AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer), tokenizer.eos_token_id)).save_pretrained(dirs[kind])
        tokenizer.save_pretrained(dirs[kind])
    return dirs


@pytest.fixture
def prompts(tmp_path):
    rows = [{"prompt": p, "completion": c} for p, c in GIVEN] + [{"prompt": "the mat"}]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def check_report(out, beta=None):
    """report.json's keys and weights = c^beta; report.html self-contained, showing every completion."""
    report = json.loads((out / "report.json").read_text())
    assert set(report) == KEYS and set(report["summary"]) == SUMMARY_KEYS
    s = report["summary"]
    assert s["beta"] == (s["auto_beta"] if beta is None else beta) and s["auto_beta"] > 0
    assert list(s["certainty_quantiles"]) == ["5%", "25%", "50%", "75%", "95%"]
    assert s["tokens"] == sum(len(c["tokens"]) for c in report["completions"])
    c = torch.tensor([x for item in report["completions"] for x in item["certainty"]])
    w = torch.tensor([x for item in report["completions"] for x in item["weight"]])
    assert ((0 <= c) & (c <= 1)).all()
    torch.testing.assert_close(w, c ** s["beta"])
    assert s["share_weight_below_half"] == pytest.approx((w < 0.5).double().mean().item())
    page = (out / "report.html").read_text()
    assert "http" not in page and "<script" not in page and "<b>" not in page  # no external reference; text escaped
    for item in report["completions"]:
        assert "".join(item["tokens"]) == item["completion"] and len(item["tokens"]) == len(item["certainty"])
        assert item["completion"] in page_text(page)
    return report


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_inspect_any_causal_lm(tiny_models, prompts, tmp_path, capsys, kind):
    out = tmp_path / "out"
    args = ["inspect", str(tiny_models[kind]), "--prompts", str(prompts), "--sample", "2", "--max-new-tokens", "6", "--out", str(out)]
    assert cli.main(args) == 0
    report = check_report(out)
    assert report["model_class"].lower().startswith(kind)
    assert [(c["line"], c["source"]) for c in report["completions"]] == [(1, "given"), (2, "given"), (3, "sampled"), (3, "sampled")]
    assert [c["completion"] for c in report["completions"][:2]] == [c for _, c in GIVEN]
    assert all(1 <= len(c["tokens"]) <= 6 for c in report["completions"][2:])
    printed = capsys.readouterr().out
    assert "4 completions (2 given, 2 sampled)" in printed and "report.html" in printed


def test_a_given_beta_and_negentropy(tiny_models, prompts, tmp_path):
    out = tmp_path / "out"
    args = ["inspect", str(tiny_models["gpt2"]), "--prompts", str(prompts), "--beta", "3", "--certainty", "negentropy",
            "--certainty-temperature", "1", "--sample", "1", "--max-new-tokens", "3", "--out", str(out)]
    assert cli.main(args) == 0
    report = check_report(out, beta=3.0)
    assert report["certainty_method"] == "negentropy" and report["summary"]["auto_beta"] != 3.0


def test_sampling_is_seeded(tiny_models, prompts, tmp_path):
    def sampled(seed):
        out = tmp_path / f"out{seed}"
        args = ["inspect", str(tiny_models["qwen2"]), "--prompts", str(prompts), "--max-new-tokens", "8", "--seed", seed, "--out", str(out)]
        assert cli.main(args) == 0
        return [c["token_ids"] for c in json.loads((out / "report.json").read_text())["completions"][2:]]

    assert sampled("1") == sampled("1") != sampled("2")


def test_the_shipped_model_on_additions(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out is runs/inspect/<model dir name>
    pairs = [(123, 45), (8402, 765)]
    rows = [{"prompt": addition.prompt(a, b), "completion": addition.completion(a, b)} for a, b in pairs]
    prompts = write_jsonl(tmp_path / "additions.jsonl", rows + [{"prompt": addition.prompt(1234, 56)}])
    assert cli.main(["inspect", str(SHIPPED), "--prompts", str(prompts), "--sample", "2", "--max-new-tokens", "20"]) == 0
    report = check_report(tmp_path / "runs" / "inspect" / SHIPPED.name)
    given = report["completions"][:2]
    assert [c["completion"] for c in given] == [addition.completion(a, b) for a, b in pairs]
    assert all(len(c["tokens"]) == len(c["completion"]) for c in given)  # one token per character
    assert report["model_class"] == "GPT2LMHeadModel" and len(report["completions"]) == 4
    captured = capsys.readouterr()
    assert "certainty (max_prob, T = 4)" in captured.out
    assert report["sampled_cut_short"] == 2 and "2 of 2 sampled completions stopped at the --max-new-tokens limit" in captured.err  # 20 < a scratchpad


def test_the_default_new_tokens_fit_the_shipped_models_scratchpad(tmp_path):
    """Issue 33: the default was 64 tokens, a quarter of a scratchpad; now the context decides, and no completion is cut."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": addition.prompt(1234, 56)}])
    assert cli.main(["inspect", str(SHIPPED), "--prompts", str(prompts), "--sample", "2", "--out", str(tmp_path / "out")]) == 0
    report = check_report(tmp_path / "out")
    assert report["sampled_cut_short"] == 0
    assert all(len(c["token_ids"]) > 64 and c["token_ids"][-1] == 40 for c in report["completions"])  # 40: end-of-text


@pytest.fixture(scope="module")
def not_causal(tmp_path_factory):
    """Paths that hold no causal LM: a file, an empty directory, an encoder's config, an encoder's weights, BERT as a
    language model without is_decoder (bidirectional attention)."""
    root = tmp_path_factory.mktemp("not-causal")
    (root / "empty").mkdir()
    (root / "file").write_text("not a model\n")
    DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(root / "distilbert")
    bert = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(bert).save_pretrained(root / "bert")
    BertLMHeadModel(bert).save_pretrained(root / "bert-lm")
    return root


@pytest.mark.parametrize("model,rows,args,message", [
    ("missing", None, [], "does not exist"),
    ("empty", None, [], "is a directory without config.json, not a Hugging Face model directory"),
    ("file", None, [], "is a file, not a model directory"),
    ("distilbert", None, [], "distilbert model, not a causal language model"),
    ("bert", None, [], "bert model (BertModel), not a causal language model"),
    ("bert-lm", None, [], "attends to later tokens"),
    ("gpt2", "", [], "holds no prompts"),
    ("gpt2", '{"prompt": "a"}\n{"prompt": \n', [], "line 2: not valid JSON"),
    ("gpt2", '{"prompt": "a"}\n\n["a"]\n', [], "line 3: expected a JSON object"),
    ("gpt2", '{"completion": "a"}\n', [], 'line 1: expected a JSON object with a "prompt" string'),
    ("gpt2", '{"prompt": "a", "completion": 3}\n', [], 'line 1: "completion" must be a string'),
    ("gpt2", '{"prompt": "a", "completion": ""}\n', [], "line 1: the completion has no tokens"),
    ("gpt2", '{"prompt": "a"}\n', ["--max-new-tokens", "200"], "line 1: 201 tokens do not fit the model's context of 128"),
    ("gpt2", None, ["--sample", "0"], "--sample must be >= 1"),
    ("gpt2", None, ["--temperature", "0"], "--temperature must be > 0"),
    ("gpt2", None, ["--beta", "-1"], "--beta must be a finite number >= 0"),
    ("gpt2", None, ["--beta", "lots"], "--beta must be a number >= 0 or 'auto'"),
    ("gpt2", None, ["--beta", "inf"], "--beta must be a finite number >= 0"),
    ("gpt2", None, ["--out", "/proc/inspect"], "cannot write in /proc"),
    ("gpt2", "\udcff", [], "is not UTF-8 text"),
    ("gpt2", None, ["--prompts", "."], "--prompts . is not a file"),  # row 14: a directory is not "missing"  # row 7 of issue 33: a file that is not UTF-8
    ("gpt2", None, ["--out", str(PACKAGE_DIR / "inspect")], "inside the installed package"),
    ("shipped", '{"prompt": "Input: hello"}\n', [], "line 1: the tokenizer cannot encode it"),
])
def test_bad_input_is_one_line(tiny_models, not_causal, prompts, tmp_path, monkeypatch, capsys, model, rows, args, message):
    monkeypatch.chdir(tmp_path)
    model_dir = {"gpt2": tiny_models["gpt2"], "shipped": SHIPPED}.get(model, not_causal / model)
    prompts = prompts if rows is None else (tmp_path / "bad.jsonl")
    if rows is not None:
        prompts.write_bytes(rows.encode("utf-8", "surrogateescape"))
    assert cli.main(["inspect", str(model_dir), "--prompts", str(prompts), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "runs").exists() and not (PACKAGE_DIR / "inspect").exists()


def test_a_tokenizer_reloaded_wrongly_is_read_as_a_plain_fast_tokenizer(tmp_path, monkeypatch):
    """Some transformers versions reload the shipped WordLevel tokenizer as a class that gives no tokens."""
    import transformers

    class NoTokens:
        def __call__(self, text, **kwargs):
            return {"input_ids": []}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: NoTokens())
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": addition.prompt(12, 3), "completion": addition.completion(12, 3)}])
    assert cli.main(["inspect", str(SHIPPED), "--prompts", str(prompts), "--out", str(tmp_path / "out")]) == 0
    assert check_report(tmp_path / "out")["completions"][0]["completion"] == addition.completion(12, 3)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["inspect", "--help"])
    assert exit_.value.code == 0 and "--prompts" in capsys.readouterr().out
