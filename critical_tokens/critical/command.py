"""The ``critical-tokens critical RUN_DIR`` command: critical tokens measured on one pre-trained model.

On additions of N+1 (or N+2) digits, the RL task's, it writes ``report.json`` and ``report.md``:
the certainty gap of the paper's table 1, where greedy failures start, and the discovery of
critical positions from the certainties alone (the measures are in `critical`); with ``--html`` or
``--png``, scratchpads shaded by certainty (drawn by `critical_pictures`). `report_markdown` turns
the saved numbers back into the Markdown report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Sequence

from .. import addition, kl
from ..addition import CriticalToken
from ..config import arg, check_fields, check_range
from .measure import TokenScores, certainty_table, critical_tokens_of, discovery_scores, teacher_forced, where_failures_start
from .pictures import Scratchpad, render_html, render_png
from ..evaluate import completions, first_difference
from ..generation import addition_stop_rule, generate
from ..runs import UserError, atomic_write_text, check_output, output_dir, write_json
from ..tokenizer import encode


# --- 1. The options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriticalConfig:
    run: str = arg(None, "pre-training run directory (or any directory holding a critical-tokens model)", positional=True, metavar="RUN_DIR")
    out: str | None = arg(None, "directory for report.json and report.md (default: RUN_DIR/critical; for a checkpoint shipped in the package, ./critical-<name>)")
    n_digits: int | None = arg(None, "N, the digits the model was pre-trained on (default: the N the model records)")
    plus: Literal[1, 2] = arg(1, "analyse additions of N+1 or N+2 digits (the RL task's distribution)")
    examples: int = arg(500, "prompts to analyse")
    certainty_temperature: float = arg(4.0, "temperature T of the certainty, eq. 1 and 2 (the paper: 4)")
    temperature: float = arg(1.0, "temperature of the probability of the right token")
    seed: int = arg(4321, "seed of the prompts and of the bootstrap")
    html: str | None = arg(None, "write scratchpads shaded by certainty to this HTML file")
    png: str | None = arg(None, "write the same picture to this PNG file")
    show: int = arg(6, "scratchpads in the picture: half correct completions, half failed generations")
    batch_size: int = arg(250, "prompts per forward pass and per generation batch")


def validate(config: CriticalConfig) -> None:
    if config.run is None:
        raise UserError("give the run directory to analyse: critical-tokens critical RUN_DIR")
    check_fields(config)
    check_range(config, ("examples", "batch_size", "certainty_temperature", "temperature"), 0, low_open=True)
    check_range(config, ("show",), 0)
    if (config.html or config.png) and config.show == 0:
        raise UserError("--html and --png draw --show scratchpads: give --show at least 1")
    check_output(config.html, "--html")
    check_output(config.png, "--png")


# --- 2. The scratchpads to draw ---------------------------------------------------------------------


def teacher_forced_scratchpad(a: int, b: int, scores: TokenScores, tokens: Sequence[CriticalToken], method: str = "max_prob") -> Scratchpad:
    return Scratchpad(f"{a}+{b}: correct completion, teacher-forced", addition.completion(a, b),
                      tuple(scores.certainty(method).tolist()), tuple(t.offset for t in tokens))


def failed_scratchpads(model, tokenizer, pairs: Sequence[tuple[int, int]], n_digits: int, certainty_temperature: float = 4.0) -> list[Scratchpad]:
    """Greedy generations for `pairs` with the generating model's certainty (eq. 2) at each step.

    Critical tokens are outlined up to the first wrong character: after it the text no longer lines
    up with the correct completion.
    """
    if not pairs:
        return []
    prompts = [encode(tokenizer, addition.prompt(a, b)) for a, b in pairs]
    longest = addition.max_completion_length(max(max(len(str(a)), len(str(b))) for a, b in pairs))
    max_new = min(longest + 100, model.config.n_positions - max(map(len, prompts)))
    was_training = model.training
    model.eval()
    try:
        out = generate(model, prompts, max_new_tokens=max_new, certainty_method="max_prob",
                       certainty_temperature=certainty_temperature, **addition_stop_rule(tokenizer))
    finally:
        model.train(was_training)
    pads = []
    for (a, b), text, certainty in zip(pairs, out.completions(tokenizer), out.certainty.cpu().numpy()):
        wrong = first_difference(addition.completion(a, b), text)
        critical = tuple(t.offset for t in addition.critical_tokens(a, b, n_digits) if t.offset <= wrong)
        verdict = "right result" if addition.is_correct(a, b, text) else "wrong result"
        pads.append(Scratchpad(f"{a}+{b}: greedy generation, {verdict}", text, tuple(certainty[: len(text)].tolist()), critical, wrong))
    return pads


def picture(model, tokenizer, pairs, scores, tokens, first_errors: Sequence[dict], n_digits: int, show: int, certainty_temperature: float) -> list[Scratchpad]:
    """`show` scratchpads: the first failed greedy generations (up to half), the rest teacher-forced correct completions."""
    failed = [(e["a"], e["b"]) for e in first_errors if not e["correct"]][: show // 2]
    pads = failed_scratchpads(model, tokenizer, failed, n_digits, certainty_temperature)
    forced = [teacher_forced_scratchpad(a, b, s, t) for (a, b), s, t in zip(pairs, scores, tokens)]
    return forced[: show - len(pads)] + pads


# --- 3. The command ---------------------------------------------------------------------------------


def critical(config: CriticalConfig) -> dict:
    """`critical-tokens critical RUN_DIR`: table 1, where failures start, discovery, pictures."""
    from ..model import load_pretrained, pick_device

    validate(config)
    out = output_dir(config.out, config.run, "critical")
    model, tokenizer, n_digits = load_pretrained(config.run, config.n_digits)
    model.to(pick_device("auto")).eval()

    # 1. Prompts of the RL task at N+plus digits, and their critical tokens from the template.
    pairs = addition.rl_pairs(n_digits, config.plus, config.examples, config.seed)
    tokens = critical_tokens_of(pairs, n_digits)
    critical_offsets = [[t.offset for t in row] for row in tokens]
    print(f"analysing {len(pairs)} additions of N+{config.plus} = {n_digits + config.plus} digits "
          f"(N = {n_digits}), {sum(map(len, tokens))} critical tokens, certainty at T = {config.certainty_temperature}")

    # 2. Certainty along the correct completions, and table 1.
    scores = teacher_forced(model, tokenizer, pairs, temperature=config.temperature,
                            certainty_temperature=config.certainty_temperature, batch_size=config.batch_size)
    table = certainty_table(scores, tokens, seed=config.seed)

    # 3. Greedy generations: where failures start, and recovery from wrong critical tokens.
    texts = completions(model, tokenizer, pairs, batch_size=config.batch_size, desc="greedy generations")
    failures = where_failures_start(pairs, texts, n_digits)

    # 4. Discovery of critical positions from the certainties alone.
    discovery = {m: discovery_scores([s.certainty(m) for s in scores], critical_offsets) for m in kl.CERTAINTY_METHODS}

    # 5. Pictures.
    pads = picture(model, tokenizer, pairs, scores, tokens, failures["first_errors"], n_digits, config.show,
                   config.certainty_temperature) if config.show else []
    report = {
        "config": asdict(config), "n_digits": n_digits, "digits": n_digits + config.plus,
        "examples": len(pairs), "critical_tokens": sum(map(len, tokens)),
        "table1": table, "failures": failures, "discovery": discovery,
        "scratchpads": [asdict(p) for p in pads],
    }
    markdown = report_markdown(report)
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown + "\n")
    if pads and config.html:
        render_html(pads, config.html)
    if pads and config.png:
        render_png(pads, config.png)
    print(markdown)
    print(f"\nwrote {out / 'report.json'} and {out / 'report.md'}"
          + "".join(f", {p}" for p in (config.html, config.png) if p and pads))
    return report


# --- 4. The report, from the saved numbers ----------------------------------------------------------


def _ci(row: dict, digits: int = 4, sign: str = "+") -> str:
    """mean [low, high]; values below 0.01 in scientific notation (the non-critical gaps are ~1e-3)."""
    if row["mean"] is None:
        return "-"
    spec = f"{sign}.{digits}f" if abs(row["mean"]) >= 0.01 else f"{sign}.2e"
    return f"{row['mean']:{spec}} [{row['ci_low']:{spec}}, {row['ci_high']:{spec}}]"


def _table_rows(table1: dict, names: Sequence[str]) -> list[str]:
    return [f"| {name} | {_ci(table1['max_prob'][name])} | {_ci(table1['negentropy'][name])} | "
            f"{_ci(table1['p_correct'][name], 3, sign='')} | {table1['max_prob'][name]['outputs']} |"
            for name in names]


def report_markdown(report: dict) -> str:
    """Table 1 (critical vs non-critical, then per name and per step/operand), where failures start,
    and discovery precision/recall@k, as Markdown."""
    t1, n, digits = report["table1"], report["n_digits"], report["digits"]
    T = report["config"]["certainty_temperature"]
    header = ["| tokens | Δ max-prob (eq. 2) | Δ negentropy (eq. 1) | p(right token) | outputs |", "|---|---|---|---|---|"]
    names = [k for k in t1["max_prob"] if k.startswith("n+")]
    places = [k for k in t1["max_prob"] if k.startswith("step")]
    lines = [
        f"## Certainty gap Δ (the paper's table 1): N = {n}, {report['examples']} additions of {digits} digits",
        "",
        f"Δ = certainty on a token - mean certainty on the other tokens of the output; certainty at T = {T}; "
        f"p(right token) at temperature {report['config']['temperature']}; mean over outputs [95% bootstrap interval].",
        "", *header, *_table_rows(t1, ["critical", "non-critical", "non-critical (lowest)"]),
        "", "### Per critical-token name", "", *header, *_table_rows(t1, names),
        "", "### Per step and operand", "", *header, *_table_rows(t1, places),
    ]
    f = report["failures"]
    frac = "-" if f["at_critical_fraction"] is None else f"{100 * f['at_critical_fraction']:.1f}%"
    rec = f["recovery"]
    rec_frac = "-" if rec["fraction"] is None else f"{100 * rec['fraction']:.1f}%"
    lines += [
        "", f"## Where failures start (greedy, {digits} digits)", "",
        f"{f['correct']}/{f['generations']} right; {f['failures']} failures, of which {f['at_critical']} ({frac}) "
        "start at a critical token.",
        f"Recovery: {rec['recovered']}/{rec['total']} generations ({rec_frac}) with a wrong critical token "
        "(the text before it right) still got the right result.",
        "", "| first wrong character | failures |", "|---|---|",
        *[f"| {category} | {count} |" for category, count in f["counts"].items()],
        "", "## Discovery without the template", "",
        "The k lowest-Δ positions of each output against its template critical tokens (mean over outputs).", "",
        "| certainty | k | precision@k | recall@k | chance precision |", "|---|---|---|---|---|",
    ]
    for method, d in report["discovery"].items():
        for k, row in d["at_k"].items():
            lines.append(f"| {method} | {k} | {row['precision']:.3f} | {row['recall']:.3f} | {d['chance_precision']:.3f} |")
    return "\n".join(lines)
