"""The log-prob memory probe (`--logprob-memory`): peak memory and time of the log-prob step alone
(LM head, log-softmax, gather; forward and backward) with full fp32 logits, through
`engine.forward.score_tokens` unchunked, and chunked. One process per variant, as the peak
resident set is per process:

    python -m engine.bench.logprob_memory VARIANT VOCAB HIDDEN ROWS SEQ_LEN CHUNK_TOKENS
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.forward import score_tokens
from engine.metrics import peak_memory_gib, reset_peak_memory

VARIANTS = ("full_logits", "unchunked", "chunked")


def logprob_step(variant: str, vocab: int, hidden: int, rows: int, seq_len: int, chunk_tokens: int) -> dict:
    """Forward + backward of the log-prob step alone over rows x seq_len scored positions."""
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(rows * seq_len, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (rows * seq_len,))
    gc.collect()
    base = _current_rss_gib()
    reset_peak_memory(torch.device("cpu"))
    start = time.perf_counter()
    if variant == "full_logits":  # the usual path: [rows, T, V] fp32 logits, log_softmax, gather
        logits = head(states.view(rows, seq_len, hidden)).float()
        logp = torch.log_softmax(logits, -1).gather(-1, targets.view(rows, seq_len, 1)).squeeze(-1)
    else:
        logp, _, _ = score_tokens(head, states, targets, 0 if variant == "unchunked" else chunk_tokens)
    logp.sum().backward()
    elapsed = time.perf_counter() - start
    peak = peak_memory_gib(torch.device("cpu"))
    return {"variant": variant, "peak_delta_gib": peak - base, "seconds": elapsed}


def _current_rss_gib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 2**20


def logprob_memory(setup: dict[str, Any]) -> dict[str, Any]:
    """Every variant in its own process at the sizes in `setup` (vocab, hidden, rows, seq_len,
    chunk_tokens; the bench's command line), printed and returned."""
    sizes = [setup[k] for k in ("vocab", "hidden", "rows", "seq_len", "chunk_tokens")]
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "engine.bench.logprob_memory", variant, *map(str, sizes)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    vocab, hidden, rows, seq_len, chunk_tokens = sizes
    logits_gib = rows * seq_len * vocab * 4 / 2**30
    print(
        f"log-prob step, {rows} x {seq_len} positions, vocab {vocab}, hidden {hidden} "
        f"(fp32 logits of all positions: {logits_gib:.2f} GiB); chunk {chunk_tokens} positions"
    )
    for variant, r in results.items():
        ratio = r["peak_delta_gib"] / results["unchunked"]["peak_delta_gib"]
        print(
            f"  {variant:12s} peak +{r['peak_delta_gib']:.3f} GiB ({ratio:.2f}x unchunked), {r['seconds']:.2f} s"
        )
    return {"setup": setup, "logits_gib": logits_gib, "results": results}


if __name__ == "__main__":
    print(json.dumps(logprob_step(sys.argv[1], *(int(x) for x in sys.argv[2:7]))))
