"""Shared pieces of the benchmark scripts: the machine header, a matmul roofline, the FLOP count.

Every benchmark measures both sides of a comparison in the same process, interleaved in rounds, and
reports the ratio per round and its median: the machines are shared and their load changes by the
minute, so only ratios measured side by side mean something.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import statistics
import time
import warnings

import torch
import transformers


def add_thread_argument(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, one per core). On a machine shared with other "
                             "jobs use 1: a descheduled OpenMP thread stalls every op of the other one")


def machine_header(title: str, threads: int | None = None) -> None:
    sys.stdout.reconfigure(line_buffering=True)  # progress visible when piped to a file
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices
    transformers.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"== {title}")
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"load average {load} (a load above the core count means other jobs share the cores)")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    if torch.get_num_threads() > 1 and os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"WARNING: {torch.get_num_threads()} threads on a loaded machine: timings can be many times slower and erratic; "
              "consider --threads 1")


def matmul_flops_per_s(n: int, seconds: float = 1.0) -> float:
    """Best float32 FLOP/s of an (n, n) @ (n, n) matmul (2 n^3 FLOPs) over repeats within `seconds`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_matmul_flops_per_s(seconds: float = 1.0) -> dict[int, float]:
    """The machine's measured float32 matmul throughput at two sizes; the max is the roofline."""
    return {n: matmul_flops_per_s(n, seconds) for n in (1024, 2048)}


def non_embedding_parameters(model) -> int:
    """N of Kaplan et al. (2020): all parameters except the token and position embeddings (the LM
    head is tied to the token embedding, so it is excluded too)."""
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return sum(p.numel() for p in model.parameters()) - embeddings


def forward_flops_per_token(model, seq_len: float) -> float:
    """Forward FLOPs per token of a GPT-2 over a sequence of `seq_len` tokens.

    Kaplan et al. (2020), "Scaling Laws for Neural Language Models", Table 1:
        C_forward ~= 2 N + 2 n_layer n_ctx d_model
    (N non-embedding parameters; the second term is the attention scores and their weighted sum,
    averaged over the causal mask). A training step costs 3 times the forward (backward = 2 x), which
    gives the 6 N + 6 n_layer n_ctx d_model of the benchmarks; PaLM (Chowdhery et al. 2022, appendix
    B) writes the attention term 12 L H Q T without halving for the causal mask.
    """
    c = model.config
    return 2 * non_embedding_parameters(model) + 2 * c.n_layer * seq_len * c.n_embd


def median(values) -> float:
    return statistics.median(values)


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}" if x >= 1 else f"{x:.3g}"


@contextlib.contextmanager
def commit_tree(root, commit: str):
    """A temporary git worktree of ``root`` at ``commit`` (a Path), removed on exit; exits with one line if it cannot be made."""
    with tempfile.TemporaryDirectory() as parent:
        tree = pathlib.Path(parent) / "baseline"
        made = subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=root, capture_output=True, text=True)
        if made.returncode:
            sys.exit(f"error: cannot check out {commit}: {made.stderr.strip().splitlines()[-1]}")
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root, capture_output=True)


def presets_dir(tree) -> pathlib.Path:
    """The folder of the packaged presets in ``tree``: critical_tokens/study/presets/ since issue 34,
    critical_tokens/presets/ at older commits."""
    new = pathlib.Path(tree) / "critical_tokens" / "study" / "presets"
    return new if new.is_dir() else pathlib.Path(tree) / "critical_tokens" / "presets"
