"""What the bench's tools share: the pairs they run (synthetic or the recipe's), a micro-batch of
them, the model they build, and sums over ranks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.config import Config
from engine.data import PairBatch

Pair = tuple[list[int], list[int], list[int]]  # prompt, chosen and rejected token ids


def synthetic_pairs(
    count: int, prompt_len: int, completion_len: tuple[int, int], vocab: int, max_length: int, seed: int
) -> list[Pair]:
    """Random-token pairs: prompt lengths log-normal with mean `prompt_len` (sigma 0.6, as
    chat prompts are skewed), chosen and rejected lengths uniform in `completion_len`, each
    completion cut to fit `max_length` (keep-start truncation, at least one token)."""
    g = torch.Generator().manual_seed(seed)
    sigma = 0.6
    mu = math.log(max(prompt_len, 1)) - sigma**2 / 2
    lo, hi = completion_len
    pairs = []
    for _ in range(count):
        p = int(torch.empty(1).log_normal_(mu, sigma, generator=g).round().clamp(4, max_length - 1).item())
        c, r = (int(torch.randint(lo, hi + 1, (1,), generator=g)) for _ in range(2))
        c, r = max(1, min(c, max_length - p)), max(1, min(r, max_length - p))
        tokens = torch.randint(3, vocab, (p + c + r,), generator=g).tolist()
        pairs.append((tokens[:p], tokens[p : p + c], tokens[p + c :]))
    return pairs


def recipe_pairs(cfg: Config, tokenizer) -> tuple[list[Pair], list[bool] | None]:
    """The recipe's training pairs, in order (`engine.data.build_dataset`), and None; for an
    unpaired loss its examples (`engine.data.unpaired_examples`: prompt, completion, KL
    completion) and their labels, as the trainer builds them."""
    from engine import losses
    from engine.data import build_dataset, unpaired_examples

    unpaired = losses.unpaired(cfg.loss)
    data = build_dataset(cfg.data.train, tokenizer, cfg.data, cfg.job.seed, unpaired=unpaired)
    if unpaired:
        kl = losses.kl_sequences(cfg.loss)
        data = unpaired_examples(data, cfg.data, cfg.job.seed, "data.train", kl=kl)
    pairs = [data.pairs[i] for i in range(len(data))]
    labels = [bool(p.desirable) for p in pairs] if unpaired else None
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs], labels


def pair_lengths(pairs: list[Pair]) -> np.ndarray:
    """[N, 3] (prompt, chosen, rejected) token counts, as `PreferenceDataset.lengths()`."""
    return np.array([[len(x) for x in pair] for pair in pairs], dtype=np.int64).reshape(-1, 3)


def pair_batch(pairs: list[Pair], ids: list[int], desirable: list[bool] | None = None) -> PairBatch:
    """A micro-batch of `pairs`, whose indices in the bench's pair list are `ids` (unpaired
    examples: with their labels `desirable`)."""
    return PairBatch(
        pair_ids=torch.tensor(ids, dtype=torch.long),
        valid=torch.ones(len(pairs), dtype=torch.bool),
        prompts=[p for p, _, _ in pairs],
        chosen=[c for _, c, _ in pairs],
        rejected=[r for _, _, r in pairs],
        desirable=None if desirable is None else torch.tensor(desirable, dtype=torch.float32),
    )


def build_causal_lm(cfg: Config, overrides: dict[str, Any]) -> torch.nn.Module:
    """The recipe's model (`engine.model.build_policy`), or with config `overrides` a random-init
    model of its config with them applied (e.g. a bench-sized Llama from the demo config)."""
    from engine.model import build_policy

    if not overrides:
        return build_policy(cfg.model, cfg.lora, cfg.job.seed)
    model_cfg = dataclasses.replace(cfg.model, random_init=True)
    return build_policy(model_cfg, cfg.lora, cfg.job.seed, config_overrides=overrides)


def reduce_over_ranks(values: list[float], device: torch.device, op=None) -> list[float]:
    """Sum (or `op`) of each value over ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()
