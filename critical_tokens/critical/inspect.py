"""The ``critical-tokens inspect MODEL_DIR --prompts FILE.jsonl`` command: a look before RL.

For any local Hugging Face causal LM and a practitioner's own prompts, it shows which completion
tokens the prioritized KL penalty would free (docs/method.md section 5): per completion token, the
model's certainty c(s) at the certainty temperature (`kl.certainty`) and the weight w = c^beta
(`kl.prioritized_weights`), with beta given or calibrated on these certainties (`kl.calibrate_beta`).

1. `load_causal_lm`: the model and its tokenizer, refusing what is not a causal LM;
2. `read_prompts`: the JSONL file, one ``{"prompt": ..., "completion": ...}`` per line;
3. `sample`: the completions (given, or sampled with ``model.generate``), then one teacher-forced
   pass each for c(s) (`critical.measure.teacher_forced_ids`);
4. `inspect`: the summary, ``report.json`` and ``report.html`` (tokens shaded by weight, `render_html`).
"""

from __future__ import annotations

import html
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from .. import checks, kl
from ..config import arg, check_fields, check_range
from ..model import model_context, pick_device
from ..runs import UserError, atomic_write_text, check_output, describe_kind, read_text, run_kind, write_json
from .measure import teacher_forced_ids
from .pictures import CRITICAL_COLOR

QUANTILES = (5, 25, 50, 75, 95)  # percent
FREED = 0.5  # the penalty frees the tokens of weight below this (as criteria.py and selection.py count them)
NEW_TOKENS_CAP = 1024  # the default --max-new-tokens of a model whose context is longer, or unknown


# --- 1. The options and the model --------------------------------------------------------------------


@dataclass(frozen=True)
class InspectConfig:
    model: str = arg(None, "a local Hugging Face causal LM directory with its tokenizer (or a critical-tokens run)", positional=True, metavar="MODEL_DIR")
    prompts: str = arg(None, 'JSONL file, one {"prompt": ..., "completion": ...} per line; lines without "completion" are sampled', metavar="FILE.jsonl")
    sample: int = arg(4, "completions sampled per prompt that has no completion")
    temperature: float = arg(1.0, "sampling temperature")
    max_new_tokens: int | None = arg(None, f"longest sampled completion, in tokens (default: what the model's context leaves after the prompt, at most {NEW_TOKENS_CAP}; a completion cut there is reported)")
    certainty: Literal["max_prob", "negentropy"] = arg("max_prob", "certainty c(s): eq. 2 (max_prob, the paper's) or eq. 1 (negentropy)")
    certainty_temperature: float = arg(4.0, "temperature T of the certainty (the paper: 4)")
    beta: str = arg("auto", "exponent of the weights w = c^beta, or 'auto': the weight is 0.5 at the 0.05 quantile of these certainties (kl.calibrate_beta)")
    seed: int = arg(0, "seed of the sampling")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    out: str | None = arg(None, "directory for report.json and report.html (default: runs/inspect/<model dir name>)")


def validate(config: InspectConfig) -> tuple[float | None, Path]:
    """Checks the options; returns beta (None for 'auto') and the output directory."""
    if config.model is None:
        raise UserError("give the model to inspect: critical-tokens inspect MODEL_DIR --prompts FILE.jsonl")
    if config.prompts is None:
        raise UserError("give the prompts: --prompts FILE.jsonl")
    check_fields(config)
    check_range(config, ("sample", "max_new_tokens"), 1)
    check_range(config, ("temperature", "certainty_temperature"), 0, low_open=True)
    beta = checks.parse_beta("--beta", config.beta)
    out = config.out if config.out is not None else str(Path("runs") / "inspect" / model_name(config.model))
    check_output(out, "--out", directory=True)
    return beta, Path(out)


def model_name(model_dir: str) -> str:
    """The model's name: its directory's, or its run's for a run's model/."""
    path = Path(model_dir).resolve()
    return (path.parent if path.name == "model" else path).name


def _causal_lm_dir(path: Path) -> Path:
    """The directory holding the model's config.json: ``path`` itself, or a critical-tokens run's model/.
    Refuses, from the config alone, a missing directory and what is not a decoder-only causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    if not path.exists():
        raise UserError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a model directory")
    kind = run_kind(path)
    if kind in ("pretrain", "rl"):
        path = path / "model"
    elif kind != "model":
        raise UserError(f"{path} is {describe_kind(kind)}, not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the model config in {path}: {str(e).splitlines()[0]}") from None
    causal_classes = set(CAUSAL.values())
    architectures = getattr(config, "architectures", None) or []
    if config.is_encoder_decoder or config.model_type not in CAUSAL or (
            architectures and not causal_classes & set(architectures)):
        saved_as = f" ({', '.join(architectures)})" if architectures else ""
        raise UserError(f"{path} holds a {config.model_type} model{saved_as}, not a causal language model")
    return path


def _check_causal(model, vocab_size: int) -> None:
    """A UserError if the logits at a position depend on a later token (an encoder such as BERT
    loaded as a language model attends both ways, and c(s) would read the answer)."""
    ids = torch.arange(6, device=model.device)[None] % vocab_size  # (1, 6)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab_size
    with torch.no_grad():
        a, b = (model(x, attention_mask=torch.ones_like(x)).logits[0, :-1] for x in (ids, changed))  # (5, V)
    if not torch.allclose(a, b, atol=1e-4):
        raise UserError(f"{type(model).__name__} attends to later tokens: not a causal language model")


def _no_tokens(tokenizer, text: str) -> bool:
    """Whether ``tokenizer`` encodes ``text`` to nothing (a saved WordLevel tokenizer that some
    transformers versions reload as another class)."""
    try:
        return not tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a text it cannot encode: `encode` reports it with its line
        return False


def load_causal_lm(model_dir: str | Path, probe: str):
    """(model in eval mode, tokenizer) from a local directory. A tokenizer that AutoTokenizer loads
    but that gives no tokens for ``probe`` is reloaded as a plain PreTrainedTokenizerFast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    path = _causal_lm_dir(Path(model_dir))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if _no_tokens(tokenizer, probe):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load the tokenizer in {path}: {str(e).splitlines()[0]}") from None
    model.eval()
    _check_causal(model, model.get_input_embeddings().num_embeddings)
    return model, tokenizer


# --- 2. The prompts ----------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[tuple[int, str, str | None]]:
    """(line number, prompt, completion or None) per non-blank line of a JSONL file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--prompts {path} does not exist")
    if not path.is_file():
        raise UserError(f"--prompts {path} is not a file (a JSONL file, one prompt per line)")
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{path}, line {number}: expected a JSON object with a "prompt" string')
        completion = record.get("completion")
        if completion is not None and not isinstance(completion, str):
            raise UserError(f'{path}, line {number}: "completion" must be a string')
        rows.append((number, record["prompt"], completion))
    if not rows:
        raise UserError(f"--prompts {path} holds no prompts")
    return rows


# --- 3. The completions and their certainties --------------------------------------------------------


def encode(tokenizer, text: str, number: int, special: bool) -> list[int]:
    """Token ids of ``text`` (with the tokenizer's own special tokens, such as a BOS, if ``special``);
    a UserError naming the line of the prompts file when the tokenizer cannot encode it."""
    try:
        return tokenizer(text, add_special_tokens=special)["input_ids"]
    except Exception as e:  # noqa: BLE001 - tokenizers raise a bare Exception (e.g. a character without <unk>)
        raise UserError(f"--prompts, line {number}: the tokenizer cannot encode it ({str(e).splitlines()[0]})") from None


def new_tokens(model, prompt: list[int], max_new_tokens: int | None) -> int:
    """The longest completion to sample after ``prompt``: ``max_new_tokens`` if given, otherwise what the
    model's context leaves after the prompt (the shipped models' scratchpads are long: a fixed small
    number would cut them), at most NEW_TOKENS_CAP."""
    if max_new_tokens is not None:
        return max_new_tokens
    context = model_context(model.config)
    return NEW_TOKENS_CAP if context is None else max(1, min(NEW_TOKENS_CAP, context - len(prompt)))


def check_line(model, number: int, prompt: list[int], completion: list[int] | None, max_new_tokens: int) -> None:
    """One-line errors for a line the model cannot take: no tokens, a token id outside the model's
    vocabulary, or more tokens than its context (a sampled completion counts ``max_new_tokens``)."""
    vocab = model.get_input_embeddings().num_embeddings
    context = model_context(model.config)
    if not prompt or completion == []:
        raise UserError(f"--prompts, line {number}: the {'prompt' if not prompt else 'completion'} has no tokens")
    if max(prompt + (completion or [])) >= vocab:
        raise UserError(f"--prompts, line {number}: a token id is outside the model's vocabulary of {vocab}: "
                        "the tokenizer does not match the model")
    length = len(prompt) + (len(completion) if completion is not None else max_new_tokens)
    if context is not None and length > context:
        raise UserError(f"--prompts, line {number}: {length} tokens do not fit the model's context of {context} "
                        "(shorten the line or lower --max-new-tokens)")


def sample(model, tokenizer, prompt: list[int], config: InspectConfig, max_new_tokens: int) -> tuple[list[list[int]], int]:
    """``config.sample`` completions of ``prompt`` (``model.generate`` at ``config.temperature``, no
    top-k or top-p), each cut after its first end-of-text token; and how many reached ``max_new_tokens``
    without one (cut short)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    # What follows a finished sequence is cut: pad it with end-of-text, which the model takes as input
    # without transformers' warning about padding tokens.
    pad = min(eos) if eos else tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([prompt], device=model.device)  # (1, P)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=config.temperature,
                         top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                         num_return_sequences=config.sample, pad_token_id=pad)  # (N, P + T)
    samples, cut = [], 0
    for row in out[:, len(prompt) :].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), None)
        cut += end is None and len(row) == max_new_tokens
        samples.append(row[:end])
    return samples, cut


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded completion, special tokens shown; they join to the
    whole decoded text (a character split over byte-level tokens goes to the token that completes it)."""
    texts, shown = [], 0
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        if text.endswith("\ufffd") and i + 1 < len(ids):  # an incomplete character: wait for its last byte
            texts.append("")
            continue
        texts.append(text[shown:])
        shown = len(text)
    return texts


# --- 4. The report -----------------------------------------------------------------------------------


def summary(certainties: torch.Tensor, beta: float | None) -> dict:
    """The certainty distribution, the 'auto' beta, the beta used (``beta``, or 'auto''s when None)
    and the share of tokens of weight below 0.5. certainties: (n,)."""
    try:
        auto = kl.calibrate_beta(certainties)
    except ValueError as e:
        if beta is None:
            raise UserError(f"--beta auto: {e}") from None
        auto = None
    used = auto if beta is None else beta
    q = torch.quantile(certainties.double(), torch.tensor([p / 100 for p in QUANTILES], dtype=torch.float64))
    return {
        "tokens": certainties.numel(), "certainty_mean": certainties.double().mean().item(),
        "certainty_quantiles": {f"{p}%": v for p, v in zip(QUANTILES, q.tolist())},
        "auto_beta": auto, "beta": used,
        "share_weight_below_half": (kl.prioritized_weights(certainties, used) < FREED).double().mean().item(),
    }


def render_html(report: dict, path: str | Path) -> None:
    """A self-contained page (inline styles, no script): each completion's tokens on a background
    from white (w = 1, penalized as usual) to orange (w = 0, free to explore), tokens of w < 0.5
    outlined; hovering a token shows c and w. A newline is shown as "↵" at the end of its line."""
    r, g, b = (int(CRITICAL_COLOR[i : i + 2], 16) for i in (1, 3, 5))
    s = report["summary"]
    title = f"Prioritized KL weights on {report['model']}"
    parts = [
        "<!doctype html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title></head>",
        '<body style="font-family: sans-serif; margin: 2em;">', f"<h2>{html.escape(title)}</h2>",
        f"<p>w = c<sup>beta</sup> with beta = {s['beta']:.4g} ('auto' would choose {_fmt(s['auto_beta'])}); "
        f"c: {html.escape(report['certainty_method'])} certainty at T = {report['certainty_temperature']:g}. "
        f"{100 * s['share_weight_below_half']:.1f}% of {s['tokens']} tokens have w &lt; 0.5 "
        f'(<span style="outline: 1px solid {CRITICAL_COLOR};">outlined</span>).</p>',
        f'<div style="display: flex; align-items: center; gap: 0.5em; font-size: 0.9em;">w = 0, free'
        f'<div style="width: 20em; height: 1em; border: 1px solid #ccc; background: linear-gradient(to right, '
        f'rgb({r}, {g}, {b}), #ffffff);"></div>w = 1, penalized</div>',
    ]
    for item in report["completions"]:
        spans = []
        for text, c, w in zip(item["tokens"], item["certainty"], item["weight"]):
            style = f"background: rgba({r}, {g}, {b}, {1 - w:.3f});" + (f" outline: 1px solid {CRITICAL_COLOR};" if w < FREED else "")
            shown = html.escape(text).replace("\n", "↵\n")
            spans.append(f'<span style="{style}" title="c = {c:.4f}, w = {w:.4f}">{shown}</span>')
        parts += [f'<h3 style="font-size: 1em;">line {item["line"]}, {item["source"]}</h3>',
                  f'<pre style="color: #777; margin-bottom: 0;">{html.escape(item["prompt"])}</pre>',
                  f'<pre style="line-height: 1.7; margin-top: 0;">{"".join(spans)}</pre>']
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def summary_text(report: dict) -> str:
    s, sources = report["summary"], [c["source"] for c in report["completions"]]
    quantiles = ", ".join(f"{p} {v:.3f}" for p, v in s["certainty_quantiles"].items())
    return "\n".join([
        f"{report['model']}: {len(sources)} completions ({sources.count('given')} given, "
        f"{len(sources) - sources.count('given')} sampled), {s['tokens']} tokens",
        f"certainty ({report['certainty_method']}, T = {report['certainty_temperature']:g}): mean {s['certainty_mean']:.3f}; "
        f"quantiles {quantiles}",
        f"beta {s['beta']:.4g} ({'auto' if report['config']['beta'] == 'auto' else 'given'}; auto would choose "
        f"{_fmt(s['auto_beta'])}): {100 * s['share_weight_below_half']:.1f}% of tokens have w = c^beta < 0.5",
    ])


def inspect(config: InspectConfig) -> dict:
    """`critical-tokens inspect MODEL_DIR --prompts FILE.jsonl`: the summary, report.json and report.html in --out."""
    beta, out = validate(config)
    device = pick_device(config.device)
    rows = read_prompts(config.prompts)
    model, tokenizer = load_causal_lm(config.model, rows[0][1])
    model.to(device)
    torch.manual_seed(config.seed)
    completions, prompts, cut = [], [], {}  # one dict per completion, with per-token lists (T,); its prompt's ids
    for number, prompt_text, completion in rows:
        prompt = encode(tokenizer, prompt_text, number, special=True)
        given = None if completion is None else encode(tokenizer, completion, number, special=False)
        max_new = new_tokens(model, prompt, config.max_new_tokens)
        check_line(model, number, prompt, given, max_new)
        if given is None:
            sampled, cut[number] = sample(model, tokenizer, prompt, config, max_new)
        for ids in [given] if given is not None else sampled:
            texts = token_texts(tokenizer, ids)
            completions.append({
                "line": number, "source": "sampled" if given is None else "given", "prompt": prompt_text,
                "completion": "".join(texts), "tokens": texts, "token_ids": ids,
                "certainty": None,
            })
            prompts.append(prompt)
    # c(s) before each completion token, from one teacher-forced pass each (one sequence at a time: a
    # model's (S, V) logits can be large); the pad id never enters a pass of one sequence.
    scores = teacher_forced_ids(model, prompts, [item["token_ids"] for item in completions], batch_size=1,
                                pad_token_id=tokenizer.pad_token_id or 0, certainty_temperature=config.certainty_temperature)
    for item, token_scores in zip(completions, scores):
        item["certainty"] = token_scores.certainty(config.certainty).tolist()
    certainties = torch.tensor([c for item in completions for c in item["certainty"]])  # (n,)
    stats = summary(certainties, beta)
    for item in completions:
        item["weight"] = kl.prioritized_weights(torch.tensor(item["certainty"]), stats["beta"]).tolist()
    report = {"config": asdict(config), "model": model_name(config.model), "model_class": type(model).__name__,
              "certainty_method": config.certainty, "certainty_temperature": config.certainty_temperature,
              "summary": stats, "completions": completions}
    report["sampled_cut_short"] = sum(cut.values())
    write_json(out / "report.json", report)
    render_html(report, out / "report.html")
    print(summary_text(report))
    if sum(cut.values()):
        print(f"warning: {sum(cut.values())} of {sum(c['source'] == 'sampled' for c in completions)} sampled completions stopped at the "
              f"--max-new-tokens limit before an end-of-text token (lines {', '.join(str(n) for n, k in cut.items() if k)}): their "
              "certainties, and an 'auto' beta, cover fragments; raise --max-new-tokens", file=sys.stderr)
    print(f"wrote {out / 'report.json'}\nwrote {out / 'report.html'}")
    return report
