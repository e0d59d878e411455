"""Preference data: load, normalise, template, tokenise, filter, truncate, mix, sample, collate.

A pair becomes three token lists: the prompt (rendered once, with the chat template's generation
prompt for conversational data) and the chosen and rejected completions (the tokens that follow
the prompt in the whole conversation's rendering, closed by EOS). Only completion tokens are
scored. Pairs get a stable id (their position after loading and mixing, before any shuffling),
which the reference log-probs are indexed by.

The parts, in the order data flows through them:
- sources.py: local files and folders, `datasets` saved folders, hub ids;
- formats.py: standard / conversational / implicit-prompt rows, column names, malformed rows;
- tokenize.py: chat templates and the exact prompt/completion split;
- cache.py: tokenising once per source with `datasets.map`, cached on disk, rank 0 first;
- dataset.py: filters, length policy, mixture sampling, statistics, the eval split, unpaired
  examples with their KL completions (kto);
- sampler.py: the global-batch sampler (optionally length-grouped), collation, padding cost.
"""

from engine.data.dataset import (
    ArrowPairs,
    PreferenceDataset,
    TokenizedPair,
    build_dataset,
    split_eval,
    token_stats,
    unpaired_examples,
)
from engine.data.sampler import (
    GlobalBatchSampler,
    PairBatch,
    collate,
    shard_for_inference,
    token_budget_micro_batches,
)
from engine.data.tokenize import resolve_chat_template

__all__ = [
    "ArrowPairs",
    "GlobalBatchSampler",
    "PairBatch",
    "PreferenceDataset",
    "TokenizedPair",
    "build_dataset",
    "collate",
    "resolve_chat_template",
    "shard_for_inference",
    "split_eval",
    "token_budget_micro_batches",
    "token_stats",
    "unpaired_examples",
]
