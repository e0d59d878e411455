"""The bench: the forward-mode benchmark (timed training steps of each forward mode on the
recipe's model), the TRL peer runner, the log-prob memory probe and the GPU check.

    python -m engine.bench RECIPE.toml [table.key=value ...] \\
        --modes concatenated,separate,packed,prefix_shared,packed@4096 [--steps 5] [--warmup 1] [--rounds 1] \\
        [--synthetic-pairs N] [--prompt-len 150] [--completion-len 50,500] \\
        [--model-config hidden_size=384,num_hidden_layers=6] [--out bench.json] [--against trl]
    torchrun --nproc_per_node 2 -m engine.bench RECIPE.toml ...
    python -m engine.bench --logprob-memory [--vocab 32000 --hidden 256 --rows 8 --seq-len 1024]
    python -m engine.bench --gpu-check OUT_DIR [--gpu-check-size auto|tiny|full] [--gpu-check-phases a,b]

A mode is a forward mode, optionally with `:OPTION`s (`packed:selective`, `concatenated:full`:
that activation checkpointing; `packed:compile`: `parallel.compile`, reporting compile time,
graphs, graph breaks and recompiles; `packed:sp2`, `prefix_shared:sp4`: `parallel.sequence_parallel`,
so that `torchrun --nproc_per_node 2 -m engine.bench ... --modes packed,packed:sp2` compares one
packed row per rank with one row split over 2 ranks), and a token budget for its micro-batches (`packed@4096`:
`training.micro_batch_tokens = 4096`; plain packed modes take the recipe's
`training.micro_batch_tokens`, padded ones its `micro_batch_size`), so a fixed pair count and a
token budget can be compared in one run. A mode's settings are checked by the recipe's own rules
(`engine.bench.modes.mode_config`: e.g. `:spN` is not for `:compile`) and the sampler's split
before any mode runs (N must divide the ranks; the heads are checked when its model is built).
Each mode gets a freshly built (same seed) model, built
and sharded by the recipe's `[parallel]` table as the trainer builds it
(`engine.step.build_model`), and its optimizer and scheduler; `--warmup` steps, then `--steps`
timed steps of the trainer's own step (`engine.step.TrainStep`: forward and backward of each
micro-batch, gradient-sync deferral, the non-finite check, clipping, optimizer and scheduler)
over the recipe's global batch (micro-batches and accumulation as in training; under `:spN`
the data-parallel degree is ranks / N and a sequence group's ranks run the same micro-batches, as
the trainer's sampler gives them),
with `--rounds` repeating the whole sequence of modes (alternating them, so that load drift
on a shared machine hits every mode alike; step times are pooled), on the same pairs for every
mode: the recipe's training data in order, or synthetic pairs
(prompt lengths log-normal around `--prompt-len`, completion lengths uniform in
`--completion-len`; the default is UltraFeedback-like). Reference log-probs are a table of zeros
on the device, looked up by pair as the trainer looks up its cached ones, so the step is the
policy's work only (its loss values mean nothing).

Per mode it reports:
- `tokens_per_s`: real pair tokens (prompt twice, chosen, rejected: what an unshared,
  padding-free layout reads; the trainer's unit) per second, all ranks, the median over the
  timed steps (medians, not means, so that a step slowed by other work on a shared machine
  does not decide the result); a sequence group's pairs count once (not once per rank), so
  `packed` on 2 ranks (data 2: each rank its own rows) and `packed:sp2` (data 1: both ranks
  halves of the same rows) on the same global batch count the same tokens and compare;
- `step_time_s` (median), `step_time_min_s`, `step_time_max_s`;
- `padding_fraction`: share of the positions run through the model that are padding;
- `computed_tokens_per_step`: positions run through the model (prefix sharing computes fewer
  than the pair tokens);
- `forwards_per_step` (mean, per data-parallel rank; a micro-batch is one forward, two in
  `separate`), `micro_batch_tokens_mean`, `micro_batch_tokens_max` and `micro_batch_tokens_cv`
  (std / mean): positions computed per forward, over all data-parallel ranks' timed forwards
  (how steady the work of a forward is; under `:spN` a forward's positions are its whole row's,
  each rank computing 1/N of them; the up to N-1 positions padding a row to a multiple of N are
  not counted here nor in `computed_tokens_per_step` and the FLOPs);
- `peak_mem_gib`: peak CUDA memory allocated, or on CPU the peak resident set size of the timed
  steps (the kernel's high-water mark, reset per mode after the allocator's free memory is
  trimmed, so earlier modes do not count), max over ranks; `peak_mem_above_start_gib`: that
  peak minus the memory in use when it was reset (after the warm-up, at the start of the timed
  steps: weights, optimizer state, the torch runtime and the allocator's retained heap), max
  over ranks: what a step adds on top, i.e. activations, gathered parameters, gradients and
  their temporaries. On CPU both are resident memory, allocator effects included (a freed
  buffer the allocator keeps still counts); a tiny model's raw peak is mostly the runtime's few
  hundred MB, so its activations' share shows in the second (the table's `step GiB`). glibc's
  default malloc keeps freed buffers below its (self-raising, up to 32 MiB) mmap threshold in
  its heap, which inflates both and blurs a 1/N ratio (a 16k-token row of a 3.4M-parameter
  Llama, packed vs packed:sp2 on 2 ranks: 0.76x the step's memory by default, 0.52x with
  `MALLOC_MMAP_THRESHOLD_=1048576`, where every buffer over 1 MiB goes back to the kernel when
  freed and the RSS follows the live tensors); run a memory comparison with that setting;
- `comm_bytes_per_step`: bytes one rank sends per timed step (mean over the steps, max over
  ranks), as bandwidth-optimal collectives move them ("bus bytes": (n-1)/n of a tensor for an
  all-gather, reduce-scatter or all-to-all over n ranks, twice that for an all-reduce), by kind:
  `sequence_all_to_all` and `sequence_all_reduce` counted by the sequence group itself while the
  steps run (`engine.sequence_parallel.SequenceGroup.sent`, from the tensors' shapes on the host:
  Ulysses' q, k, v and output all-to-alls of every attention layer in forward, each one's
  backward, and again in an activation-checkpoint recompute; the per-sequence sums' all-reduce);
  `fsdp_all_gather`, `fsdp_reduce_scatter`, `fsdp_all_reduce` computed from the sharded
  parameters' unsharded sizes (`engine.bench.modes.fsdp_bytes`, FSDP's shard padding left out):
  every parameter in the compute dtype gathered once per forward (twice with a batch-coupled
  loss's no-grad pre-pass) and again in backward for the units resharded after forward (all
  but the output unit, which stays gathered; none under `grad_op`), the trainable gradients in
  `parallel.reduce_dtype` reduce-scattered once per micro-batch (once per step under
  gradient-sync deferral) and, with replicas (`hybrid`, `none`), all-reduced across them. Checked
  against the bytes handed to gloo's collectives for `packed` with and without `:sp2`, `:full`
  and `:selective` (equal); `separate` (two forwards, one backward) is counted as two forwards'
  re-gathers, an upper bound (the input embedding's two backwards run back to back, gathered once);
  the table's `comm MiB` is their sum, with a line by kind;
- `mfu`: model FLOPs / step time / (peak FLOP/s x ranks), median over steps, and
  `model_flops_per_step`: the trainer's count (`engine.metrics.model_flops`: linear layers over
  the positions computed, attention over the (query, key) pairs attended, the LM head over the
  scored positions, no recompute). The peak (`engine.metrics.device_peak`; `setup.peak_flops`,
  `setup.peak_source`): on a known CUDA device its dense peak in the compute dtype, else the
  matmul rate measured on this device in this run (`setup.matmul_flops`, reported either way):
  a 2048^3 matmul by default, timed before every round and at the end, the best of those (so
  that one measurement taken under other load does not inflate the MFU), in the compute dtype,
  on CPU the faster of it and fp32 (`engine.metrics.matmul_peak`; `setup.matmul_dtype` says
  which).

`ratios` are paired: the median over timed steps of one mode's speed-up over another on the
same pairs (robust on a shared machine, where a mode's median alone moves with the load). A
`:spN` mode is compared with the same mode without it (`packed:sp2/packed`), and their per-rank
memory too: `peak_mem packed:sp2/packed` (raw peaks) and `peak_mem_above_start packed:sp2/packed`
(what the steps add: near 1/N when activations dominate it).

`--against trl` runs TRL's `DPOTrainer` (when installed: `pip install trl`) on the same model
weights, pairs (pre-tokenized, in the same order), batch and accumulation, configured at its
fastest on this device (precomputed reference, no gradient checkpointing, fp32/bf16 as fsdpo),
and reports the same numbers and the ratio. Results depend on the allocator on CPU (see
FINDINGS): the JSON records the MALLOC_* environment the run had.

The package, in the order data flows (each module imports only those before it):
- common.py: the pairs (synthetic, the recipe's), a micro-batch of them, the model, rank sums;
- modes.py: one forward mode's timed steps and their accounting (`run_mode`, `summarize`);
- trl.py: the TRL runner, timed and counted as a mode is;
- logprob_memory.py: the log-prob step's memory probe (one process per variant);
- gpu_check.py: the GPU check (`--gpu-check`), through modes.py's runs;
- cli.py: the command line, the rounds and the report (`main`; __main__.py runs it).
"""
