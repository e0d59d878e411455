"""Recipe schema: one documented dataclass per TOML table, the per-table checks, value parsers.

The ground floor of the engine: it imports nothing from engine/ but the error type. Reading a
recipe (TOML, `extends`, overrides, typing, the names of registered losses and forward modes,
writing it back, the generated reference) is engine/recipe.py's.

Every field carries a docstring directly under it; `python -m engine.recipe --doc` prints them as
the recipe reference. Each component of the engine receives only its own table (`cfg.loss`,
`cfg.data`, ...).

Paths: `extends` is relative to the recipe that names it. Every other path in a recipe (model,
data, chat template, caches, output folder, checkpoint to resume) is relative to the working
directory the run starts in, as in TRL, open-instruct and torchtune, and is made absolute at load
(`absolute_paths`), so the recipe fsdpo stores with a run and in each checkpoint, and the
model path written into an exported adapter, work from any directory. Hub ids stay as written.

All problems in a recipe (unknown keys, wrong types, out-of-range or conflicting values) are
reported together, one line each in the recipe's order, in one UserError (`Problems`).
"""

from __future__ import annotations

import ast
import inspect
import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.errors import UserError, did_you_mean


def is_local_path(text: str) -> bool:
    """Whether `text` (a `model.path` or data source) names a local file or folder rather than a
    Hugging Face hub id. Relative paths are relative to the working directory.

    Local: an existing file or folder; anything starting with `.`, `/` or `~`; more than one `/`;
    or `a/b` where `a` is an existing local folder (a typo such as `models/qwen` fails at once
    instead of being tried as a hub repository). Everything else (`gpt2`, `org/name`) is a hub id.
    """
    if not text:
        return False
    if text.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(text)):
        return True
    parts = text.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


@dataclass
class JobConfig:
    output_dir: str = "outputs/run"
    """Folder for recipe.toml, metrics.jsonl and final/ (created if missing); relative to the
    working directory, stored absolute."""
    seed: int = 42
    """Seed for data order, random init and dropout; the same seed gives the same run."""
    overwrite: bool = False
    """Allow a run to replace the files a previous run left in `output_dir` (metrics.jsonl,
    recipe.toml, final/). Files fsdpo did not write are never touched."""


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face model folder or hub id (required). A local path (`is_local_path`) is relative
    to the working directory and stored absolute; a hub id is kept as written."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: `sdpa`, `eager`, `flash_attention_2`, ..."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the model. Off unless you trust the source."""
    random_init: bool = False
    """Build the model from `path`'s config.json with random weights (seeded by `job.seed`)
    instead of loading weights. For demos and tests."""
    disable_dropout: bool = True
    """Train with every dropout probability of the model at 0 (its config's and its dropout
    layers'), as TRL does by default: the policy then starts equal to the reference (a DPO loss of
    ln 2 at step 0) and every forward mode computes the same log-probs. `lora.dropout` is apart."""


@dataclass
class DataSource:
    path: str = ""
    """A local .json (array or JSON lines), .jsonl or .parquet file; a folder of such files (read
    in sorted order); a folder written by `datasets`' `save_to_disk`; or a Hugging Face hub
    data set id (loaded with `datasets.load_dataset`, so it works offline from the local cache).
    Local paths are relative to the working directory and stored absolute."""
    split: str = "train"
    """Split to read from a hub id or a saved DatasetDict (e.g. "train_prefs"); ignored for files."""
    subset: str = ""
    """Hub only: the configuration (subset) name passed to `load_dataset`; empty = the default."""
    revision: str = ""
    """Hub only: branch, tag or commit to load; empty = the default branch."""
    fraction: float = 1.0
    """Share of this source's pairs to use, after filtering; > 1 repeats pairs (seeded)."""
    count: int = -1
    """Exact number of pairs to use after filtering (seeded sample; repeats if larger); -1 = use
    `fraction`."""
    columns: dict[str, str] = field(default_factory=dict)
    """This source's column names, overriding `data.columns` (e.g. { chosen = "response_a" })."""


@dataclass
class DataConfig:
    train: list[DataSource] = field(default_factory=list)
    """Training sources (required): paths or hub ids, or tables with `path` and optionally
    `split`, `subset`, `revision`, `fraction` or `count`, and `columns` (the DataSource fields);
    several tables make a mixture, each source sampled with `job.seed` and its place in the list
    (not its path: a moved data folder samples the same pairs)."""
    eval: list[DataSource] = field(default_factory=list)
    """Held-out sources, evaluated before training, every `training.eval_interval_steps` and at
    the end."""
    eval_fraction: float = 0.0
    """Share of the training pairs held out as the eval set when `eval` is empty (seeded; no
    underlying row is in both sets); 0 = no held-out set."""
    format: Literal["auto", "standard", "conversational", "implicit_prompt", "unpaired"] = "auto"
    """Row format. `standard`: `prompt`, `chosen`, `rejected` strings. `conversational`: `prompt`
    a list of messages, `chosen`/`rejected` one assistant message (or a string). `implicit_prompt`:
    `chosen`/`rejected` whole conversations whose shared turns before the final assistant turn
    are the prompt. `unpaired` (for unpaired losses such as kto): `prompt`, `completion` (either
    shape above, or no prompt and `completion` a whole conversation) and a boolean `label` (true:
    desirable). `auto` decides per row: a `label` without `chosen` is unpaired, a message-list
    prompt is conversational, all strings is standard, otherwise implicit (a string prompt beside
    conversations is then ignored)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column names in the data for `prompt`, `chosen` and `rejected` (`completion`, `label`),
    where they differ (e.g. { chosen = "response_a", rejected = "response_b" })."""
    unpair: bool = False
    """For unpaired losses (kto): split each preference pair into a desirable example (prompt,
    chosen) and an undesirable one (prompt, rejected), as TRL's KTOTrainer does with paired data."""
    kl_shift_chunk: int = 0
    """Unpaired losses with a KL term (kto): which completion each example's KL sequence (its
    prompt with another example's completion, for the KL estimate z0) borrows. 0: a seeded (`job.seed`) random cycle
    over the data set's examples (never the example's own completion). k > 0: TRL 1.16's rule:
    within consecutive chunks of k examples in data-set order, each takes the previous example's
    completion and the first the chunk's last (TRL's k is per_device_train_batch_size)."""
    chat_template: str = ""
    """Jinja chat template (the template text, or the path of a .jinja file, relative to the working
    directory) used instead of the tokenizer's own for conversational rows; empty = the
    tokenizer's template."""
    max_length: int = 1024
    """Maximum prompt + completion tokens per sequence (see `truncation`)."""
    max_prompt_length: int = 0
    """Maximum prompt tokens; a longer prompt keeps its last this many tokens (its most recent
    turns and the generation prompt) under `keep_start`, or drops the pair under `drop`. 0 = no
    separate prompt limit."""
    truncation: Literal["keep_start", "drop"] = "keep_start"
    """Pairs over the length limits: `keep_start` cuts completions from the end (pairs left
    with no completion token are dropped); `drop` drops the pair. Counted per source."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row (missing column, wrong type, empty or unknown-role messages, a template
    that rejects it): `error` stops naming source, row and problem; `skip` drops and counts it."""
    group_by_length: bool = False
    """Sample global batches of similar length (less padding): within each epoch's shuffle,
    chunks of 64 global batches are sorted by length and the batches' order is shuffled."""
    num_proc: int = 0
    """Processes for tokenisation (`datasets.map`); 0 = one per 10,000 rows, at most 8 and at
    most the CPU count."""
    cache_dir: str = ""
    """Folder of tokenised data sets, reused when sources, tokenizer, template and format are
    unchanged (relative to the working directory); empty = $XDG_CACHE_HOME/fsdpo/tokenized
    (default ~/.cache/fsdpo/tokenized)."""


@dataclass
class LossConfig:
    type: str | list[str] = "dpo"
    """Loss name, or a list of names combined with `weights` (e.g. ["dpo", "sft"] for RPO).
    See engine/losses.py for the registry."""
    weights: list[float] = field(default_factory=list)
    """Weight of each loss in `type` when it is a list (default 1.0 each)."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward (the KL strength for DPO-style losses)."""
    label_smoothing: float = 0.0
    """Assumed probability that a preference label is flipped (cDPO, robust DPO, SimPO)."""
    gamma_beta_ratio: float = 0.5
    """SimPO's target reward margin gamma, as a ratio gamma / beta."""
    ipo_normalize: bool = True
    """IPO on length-normalised log-ratios (TRL's choice); false uses summed log-ratios (paper)."""
    wpo_clamp: bool = True
    """Clamp WPO's pair weight at 1, as the paper's released code does."""
    discopop_tau: float = 0.05
    """Temperature of DiscoPOP's log-ratio modulation."""
    orpo_lambda: float = 0.1
    """ORPO's weight lambda of the odds-ratio term (the paper's 0.1). TRL's ORPOConfig passes it as
    `beta`; here `loss.beta` only scales ORPO's logged rewards."""
    cpo_alpha: float = 1.0
    """CPO's weight of the NLL of the chosen completion (TRL's `cpo_alpha`)."""
    alphapo_alpha: float = 0.0
    """AlphaPO's reward shape for `simpo` and `cpo`: the reward log p becomes (1 - p^-alpha) / alpha
    (p the length-normalised sequence probability for simpo, the sequence probability for cpo);
    0 keeps log p (SimPO, CPO). TRL's CPOConfig `alpha`; the paper's Mistral setting is 0.25."""
    kto_desirable_weight: float = 1.0
    """KTO's weight lambda_D of the desirable examples' losses (TRL's `desirable_weight`); also
    `apo_zero_unpaired`'s."""
    kto_undesirable_weight: float = 1.0
    """KTO's weight lambda_U of the undesirable examples' losses (TRL's `undesirable_weight`); the
    paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3] for n_D desirable, n_U undesirable."""
    f_divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    """f-DPO's divergence (Wang et al. 2023): each log-ratio log u of `dpo`, `dpo_norm`, `wpo`,
    `ipo`, `hinge`, `robust`, `exo_pair` and `discopop` becomes f'(u), normalised to 0 at u = 1:
    forward_kl 1 - 1/u, js_divergence log(2u / (1 + u)), alpha_divergence (1 - u^-f_alpha) / f_alpha.
    reverse_kl keeps log u (DPO). Rewards stay beta log u."""
    f_alpha: float = 0.5
    """alpha of `f_divergence = "alpha_divergence"`, in (0, 1) as in the paper (towards 0 it is the
    reverse KL, at 1 the forward KL). TRL 1.16's `f_alpha_divergence_coef` is 1 - f_alpha."""
    ld_alpha: float = 1.0
    """LD-DPO (Liu et al. 2024): weight of the log-probs of a completion's tokens beyond its pair's
    shared length l = min(chosen tokens, rejected tokens); each summed log-prob becomes
    (sum over the first l tokens) + ld_alpha x (sum over the rest) before the losses see it
    (every reference-based loss and `simpo`; not `sft`'s NLL). In (0, 1]; 1 = off (the forward
    computes no shared-length sums)."""
    ld_sides: Literal["both", "policy"] = "both"
    """Whose log-probs `ld_alpha` reweights: `both` the policy's and the reference's (TRL),
    `policy` the policy's only (ms-swift, LLaMA-Factory)."""
    beta_dpo_alpha: float = 0.6
    """beta-DPO's (Wu et al. 2024) scale a of the batch beta: beta (1 + a (mean kept margin -
    running mean margin)), floored at 1e-3 (the paper's code `loss.a`, 0.6 in its recipes; 0 keeps
    beta)."""
    beta_dpo_filter: float = 0.2
    """beta-DPO's fraction of each step's pairs left out, sampled without replacement with weights
    exp(-z^2 / 2) of the margin's z-score (the paper's code `loss.mode_weight`), in [0, 1)."""
    beta_dpo_momentum: float = 0.9
    """beta-DPO's momentum of the running mean and std of the margins (its code's gamma), in [0, 1)."""
    tdpo_alpha: float = 0.5
    """TDPO2's (Zeng et al. 2024) weight alpha of the sequential KL difference (the paper's code
    `loss.alpha`, 0.5); `tdpo1` takes none."""


@dataclass
class TrainingConfig:
    global_batch_size: int = 8
    """Pairs per optimizer step, summed over ranks and accumulation steps."""
    micro_batch_size: int = 1
    """Pairs per rank per forward; accumulation = global / (micro x ranks), which must divide.
    Not used when `micro_batch_tokens` is set."""
    micro_batch_tokens: int = 0
    """Packed forward modes: fill each micro-batch with pairs up to this many tokens (positions
    of the packed row) instead of `micro_batch_size` pairs, so every forward does a steady amount
    of work. Each rank's share of the global batch is split into as few micro-batches as fit
    (the same count on every rank, as FSDP needs); the loss stays the mean over the global
    batch's pairs. Must hold the longest pair. Under `parallel.sequence_parallel` = N it counts
    the whole row of a sequence group, of which each rank holds 1/N. 0 = off."""
    epochs: int = 1
    """Passes over the training pairs (ignored when `max_steps` > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 derives them from `epochs`."""
    forward_mode: str = "concatenated"
    """How a micro-batch of pairs is laid out for the model: a forward mode registered in
    engine/forward.py (the reference lists them). All give the same log-probs."""
    logprob_chunk_tokens: int = 1024
    """Scored positions per chunk through the LM head and log-softmax (fp32 logits of one chunk
    at a time, recomputed in backward); 0 = all at once, keeping the logits for backward."""
    attention_kernel: Literal["auto", "varlen", "flash_attn", "flex", "sdpa_loop"] = "auto"
    """Attention kernel of the packed modes (`packed`, `prefix_shared`): `varlen` (torch's
    varlen_attn, CUDA), `flash_attn` (flash-attn >= 2.1, CUDA), `flex` (flex_attention, CUDA),
    `sdpa_loop` (one sdpa call per sequence; the only one on CPU). `auto` takes the first of these
    installed that serves each layer (windows, softcapping, dropout, dtype); a forced one serves
    the layers it can and leaves the rest to the next. The choice is logged at start-up and
    written to data_stats.json. Padded modes use `model.attn_implementation`."""
    eval_interval_steps: int = 0
    """Evaluate every this many steps (0 = only before training and at the end)."""
    max_skipped_steps: int = 3
    """Stop with an error after this many consecutive steps with a NaN/inf loss."""


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """Decoupled weight decay, not applied to norms and biases."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""


@dataclass
class SchedulerConfig:
    type: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate shape after warmup: constant, linear decay or cosine decay."""
    warmup_steps: int = 0
    """Steps of linear warmup to `optimizer.lr`: step s (from 0) trains at (s + 1) / (warmup + 1) of
    it, so no step trains at lr 0 (Hugging Face / TRL: s / warmup, their first step at 0)."""
    warmup_ratio: float = 0.0
    """Warmup as a share of the total steps (use this or `warmup_steps`, not both)."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the decay as a share of the peak."""


@dataclass
class ParallelConfig:
    sharding: Literal["full", "grad_op", "hybrid", "none"] = "full"
    """How state is split over ranks (FSDP2): `full` = ZeRO-3 / FULL_SHARD (parameters, gradients
    and optimizer state sharded, parameters freed after forward); `grad_op` = ZeRO-2 /
    SHARD_GRAD_OP (sharded, parameters kept gathered from forward to backward); `hybrid` = HSDP
    (shard within groups of ranks, replicate across groups: for many nodes); `none` = ZeRO-0 /
    DDP (everything replicated, gradients all-reduced)."""
    replicate_degree: int = 0
    """`hybrid` only: number of replica groups; 0 = one per node (ranks / ranks per node)."""
    mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute dtype of the sharded model: `auto` is bf16 on CUDA and fp32 on CPU. Master
    weights, gradient reduction and log-softmax stay in fp32."""
    reshard_after_forward: bool | Literal["auto"] = "auto"
    """Free gathered parameters after each block's forward; `auto` follows `sharding` (true for
    full/hybrid, false for grad_op). Setting it against the sharding is an error."""
    gradient_sync: Literal["auto", "every_micro_batch", "last_micro_batch"] = "auto"
    """When gradients are reduced across ranks during accumulation: `last_micro_batch` skips the
    collective on all but the last micro-batch (less communication, but unsharded gradients are
    held between micro-batches); `auto` is last_micro_batch for `none` (where gradients are
    unsharded anyway) and every_micro_batch otherwise."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the gradient reduce-scatter / all-reduce: fp32 (exact sums; the default) or bf16
    (half the gradient traffic, rounded sums)."""
    collective_timeout_s: int = 600
    """Seconds a collective (all-gather, all-reduce, barrier) waits for a peer before the run
    fails (NCCL's watchdog, gloo's timeout). Raise it when ranks legitimately wait long on each
    other, e.g. a slow shared file system at checkpoints or long first compiles."""
    cpu_offload: bool = False
    """Keep parameters, gradients and the optimizer step on the host (FSDP2 CPUOffloadPolicy) for
    models that do not fit on the GPUs. A no-op on CPU-only runs."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward instead of storing them: `full` recomputes whole decoder
    blocks (least memory, ~1/3 more compute); `selective` keeps each block's matmul and attention
    outputs and recomputes only the cheap element-wise ops between them (norms, activations,
    rotary, residual adds: torchtitan's op-level policy), for most of full's saving at a few
    percent of compute."""
    activation_checkpointing_every: int = 1
    """With `full` or `selective`: checkpoint every n-th block only (1 = all blocks; 2 = half)."""
    compile: bool = False
    """torch.compile each decoder block (needs a C++ compiler on CPU)."""
    sequence_parallel: int = 1
    """Ranks that split each packed row along its positions (Ulysses sequence parallelism, for
    pairs too long for one device): ranks r*N .. r*N+N-1 form a sequence group that runs the same
    micro-batches, each rank 1/N of the row's positions, attention exchanging heads for positions
    (all-to-all; the model's attention heads and KV heads must divide by N). Parameters stay
    sharded over all ranks; the data-parallel degree is ranks / N. Every forward mode (a padded
    mode's rows are laid end to end first, padding included) and both reference modes; not with
    `parallel.compile`. 1 = off."""


@dataclass
class ReferenceConfig:
    cache_dir: str = ""
    """Folder of the reference log-prob cache files (relative to the working directory); empty =
    output_dir/reference. Point several runs at one folder to share caches (files are keyed by
    model, tokenizer, data and settings)."""
    batch_size: int = 0
    """Pairs per rank per reference forward (no grad, so larger than training); 0 = 4 x
    `training.micro_batch_size`."""
    mode: Literal["cached", "live"] = "cached"
    """`cached`: reference log-probs computed once by the initial policy and cached (above).
    `live`: a frozen copy of the initial policy (with LoRA the base model, adapters off: no
    copy), sharded as the policy and run beside it on every micro-batch; needed by `tdpo` and by
    `sync_steps` (TR-DPO)."""
    sync_steps: int = 0
    """TR-DPO (Gorbatovski et al. 2024): every `sync_steps` optimizer steps the live reference
    becomes sync_alpha x policy + (1 - sync_alpha) x reference (TRL's `ref_model_sync_steps`);
    0 = never (a frozen reference). Needs `mode = "live"`, not LoRA."""
    sync_alpha: float = 1.0
    """TR-DPO's mix-up weight alpha in (0, 1] (TRL's `ref_model_mixup_alpha`): 1 copies the
    policy (hard update every tau = sync_steps), below 1 a soft (EMA) update."""


@dataclass
class CheckpointConfig:
    interval_steps: int = 0
    """Save a DCP checkpoint every this many steps (0 = off)."""
    interval_epochs: int = 0
    """Save a checkpoint at the end of every this many epochs (0 = off)."""
    keep_last: int = 0
    """Keep only the newest this many complete checkpoints (0 = keep all)."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint in output_dir if any; `never`: start
    fresh; or the path of a `step-N` checkpoint folder (relative to the working directory)."""
    async_save: bool = False
    """Write checkpoints in a background thread (dcp.async_save on its own gloo group) while
    training continues; waited on before the next save and at exit."""


@dataclass
class LoggingConfig:
    interval_steps: int = 1
    """Write a metrics row and a console line every this many steps."""
    wandb: bool = False
    """Also log to Weights & Biases (rank 0)."""
    project: str = "fsdpo"
    """wandb project."""
    entity: str = ""
    """wandb entity (team or user); empty = your default."""
    run_name: str = ""
    """wandb run name; empty = the output folder's name."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """wandb mode: `auto` is online when an API key is configured, otherwise offline."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights; the base weights stay frozen."""
    r: int = 16
    """Rank of each adapter."""
    alpha: float = 32.0
    """Scaling numerator: adapters are scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt (e.g. ["q_proj", "v_proj"]) or "all-linear" (every linear layer but
    the LM head)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters (e.g. ["lm_head"])."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""


@dataclass
class ExportConfig:
    enabled: bool = True
    """Write output_dir/final/ as a Hugging Face folder at the end of training."""
    lora: Literal["adapter", "merged", "both"] = "merged"
    """With LoRA: `merged` writes final/ as a full model with the adapters merged in; `adapter`
    writes final/ as a PEFT adapter folder (PeftModel.from_pretrained); `both` writes the merged
    model in final/ and the adapter in final/adapter/."""
    max_shard_size: str = "5GB"
    """Largest safetensors file in final/ (e.g. "2GB", "500MiB"); also bounds the host memory the
    export needs on rank 0, since weights are streamed file by file."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the exported weights: `auto` keeps the dtype declared in the model's config
    (float32 when it declares none); training always keeps fp32 master weights."""


@dataclass
class HubConfig:
    push: bool = False
    """Upload final/ to the Hugging Face Hub after training (token from the environment, HF_TOKEN
    or `hf auth login`; never from the recipe)."""
    repo_id: str = ""
    """Target repository, e.g. "my-org/llama-3-8b-dpo" (required when push is true)."""
    private: bool = True
    """Create the repository as private if it does not exist."""
    commit_message: str = "Upload model trained with fsdpo"
    """Commit message of the upload."""


@dataclass
class PostTrainConfig:
    command: str = ""
    """Shell command run on rank 0 after export, e.g. an evaluation harness; `{model_dir}` and
    `{output_dir}` are replaced by the (quoted) paths. Its output and exit status are recorded in
    output_dir/post_train.log and post_train.json. Empty = nothing."""


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    post_train: PostTrainConfig = field(default_factory=PostTrainConfig)


# ----------------------------------------------------------------------------------------------
# Field documentation (the docstrings under each field, read from this file's source)


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to the docstring written directly under it."""
    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


# ----------------------------------------------------------------------------------------------
# Problems: every mistake in a recipe is reported in one go


def _related(a: str, b: str) -> bool:
    """Whether dotted keys `a` and `b` name the same value or one holds the other."""
    return a == b or b.startswith((f"{a}.", f"{a}[")) or a.startswith((f"{b}.", f"{b}["))


def _position(raw: dict[str, Any], key: str) -> tuple[int, int]:
    """Where `key` ("table.name...", or a top-level name) stands in the recipe: (table, key) in file
    order; a key the recipe does not set comes after those it does; "" (the command line) first."""
    if not key:
        return (-1, -1)
    table, _, rest = key.partition(".")
    tables = list(raw)
    inner = raw.get(table)
    names = list(inner) if isinstance(inner, dict) else []
    name = rest.split(".")[0].split("[")[0]
    return (
        tables.index(table) if table in raw else len(tables),
        names.index(name) if name in names else len(names),
    )


class Problems:
    """The recipe's problems found so far, each with the key it is about, and the keys whose values
    failed to type-check: those fields hold defaults, so checks involving them are skipped."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []
        self.failed: list[str] = []

    def add(self, key: str, *lines: str, failed: bool = False) -> None:
        self.found += [(key, line) for line in lines]
        if failed:
            self.failed.append(key)

    def require(self, ok: bool, message: str, key: str, *also: str) -> None:
        """Record `message` (about `key`) if not `ok`, unless `key` or a key in `also` failed."""
        if not ok and not any(_related(f, k) for f in self.failed for k in (key, *also)):
            self.found.append((key, message))

    def expect(self, ok: bool, key: str, expected: str, value: Any, *also: str) -> None:
        self.require(ok, f"{key}: expected {expected}, got {value!r}", key, *also)

    def raise_if_any(self, raw: dict[str, Any]) -> None:
        """One UserError with every problem, in the recipe's order (command-line ones first)."""
        if self.found:
            order = sorted(range(len(self.found)), key=lambda i: (_position(raw, self.found[i][0]), i))
            raise UserError(*(self.found[i][1] for i in order))


# ----------------------------------------------------------------------------------------------
# Value parsers and paths


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20 (transformers' convention)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, None: 1}
    return int(float(match.group(1)) * units[match.group(2).lower() if match.group(2) else None])


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with its relative local paths (relative to the working directory) made absolute, in
    place, so the recipe fsdpo stores means the same from any directory: `model.path` and data
    sources when `is_local_path`, `data.chat_template` when it names a file, the cache and output
    folders, and `checkpoint.resume` when it is a path. Hub ids and absolute paths are kept."""
    if is_local_path(cfg.model.path):
        cfg.model.path = _absolute(cfg.model.path)
    for source in (*cfg.data.train, *cfg.data.eval):
        if is_local_path(source.path):
            source.path = _absolute(source.path)
    if cfg.data.chat_template and os.path.isfile(os.path.expanduser(cfg.data.chat_template)):
        cfg.data.chat_template = _absolute(cfg.data.chat_template)
    for table, name in (("job", "output_dir"), ("data", "cache_dir"), ("reference", "cache_dir")):
        if getattr(getattr(cfg, table), name):
            setattr(getattr(cfg, table), name, _absolute(getattr(getattr(cfg, table), name)))
    if cfg.checkpoint.resume not in ("auto", "never"):
        cfg.checkpoint.resume = _absolute(cfg.checkpoint.resume)
    return cfg


# ----------------------------------------------------------------------------------------------
# Per-table checks


def check(cfg: Config, problems: Problems) -> None:
    """Range and consistency checks the types alone cannot express, recorded in `problems`;
    checks on a key whose value already failed its type check are skipped. The names of
    registered losses and forward modes are engine.recipe's to check (`check_names`)."""

    p = problems
    p.expect(bool(cfg.model.path), "model.path", "a model folder or hub id", cfg.model.path)
    p.expect(bool(cfg.data.train), "data.train", "at least one training source", cfg.data.train)
    d = cfg.data
    column_tables = [("data.columns", d.columns)]
    for key, sources in (("data.train", d.train), ("data.eval", d.eval)):
        for i, src in enumerate(sources):
            p.expect(bool(src.path), f"{key}[{i}].path", "a file, folder or hub id", src.path)
            p.expect(bool(src.split), f"{key}[{i}].split", "a split name", src.split)
            p.expect(src.fraction > 0, f"{key}[{i}].fraction", "a number > 0", src.fraction)
            p.expect(src.count == -1 or src.count > 0, f"{key}[{i}].count", "-1 or > 0", src.count)
            column_tables.append((f"{key}[{i}].columns", src.columns))
    for key, columns in column_tables:
        for name, column in columns.items():
            known = ["prompt", "chosen", "rejected", "completion", "label"]
            message = (
                f"{key}.{name}: expected keys prompt, chosen, rejected, completion or label"
                f"{did_you_mean(name, known)}"
            )
            p.require(name in known, message, f"{key}.{name}")
            p.expect(bool(column), f"{key}.{name}", "a column name", column)
    p.expect(0 <= d.eval_fraction < 1, "data.eval_fraction", "a number in [0, 1)", d.eval_fraction)
    p.require(
        not (d.eval and d.eval_fraction),
        "data.eval and data.eval_fraction: set one of them, not both",
        "data.eval",
        "data.eval_fraction",
    )
    p.expect(d.max_length >= 2, "data.max_length", "an integer >= 2", d.max_length)
    p.expect(
        0 <= d.max_prompt_length < d.max_length,
        "data.max_prompt_length",
        f"0 (off) or an integer below data.max_length={d.max_length}",
        d.max_prompt_length,
        "data.max_length",
    )
    p.expect(d.num_proc >= 0, "data.num_proc", "0 (auto) or a number of processes", d.num_proc)
    p.expect(
        d.kl_shift_chunk >= 0, "data.kl_shift_chunk", "0 (random) or a chunk size >= 1", d.kl_shift_chunk
    )

    names = [cfg.loss.type] if isinstance(cfg.loss.type, str) else cfg.loss.type
    p.expect(bool(names), "loss.type", "a loss name or a non-empty list", cfg.loss.type)
    p.expect(
        not cfg.loss.weights or len(cfg.loss.weights) == len(names),
        "loss.weights",
        f"{len(names)} weights (one per loss.type)",
        cfg.loss.weights,
        "loss.type",
    )
    p.expect(cfg.loss.beta > 0, "loss.beta", "a number > 0", cfg.loss.beta)
    p.expect(
        0 <= cfg.loss.label_smoothing < 0.5,
        "loss.label_smoothing",
        "a number in [0, 0.5)",
        cfg.loss.label_smoothing,
    )
    lc = cfg.loss
    p.expect(lc.orpo_lambda >= 0, "loss.orpo_lambda", "a number >= 0", lc.orpo_lambda)
    p.expect(lc.cpo_alpha >= 0, "loss.cpo_alpha", "a number >= 0", lc.cpo_alpha)
    for key in ("kto_desirable_weight", "kto_undesirable_weight"):
        p.expect(getattr(lc, key) > 0, f"loss.{key}", "a number > 0", getattr(lc, key))
    p.expect(0 < lc.f_alpha < 1, "loss.f_alpha", "a number in (0, 1)", lc.f_alpha)
    p.expect(0 <= lc.beta_dpo_filter < 1, "loss.beta_dpo_filter", "a number in [0, 1)", lc.beta_dpo_filter)
    p.expect(
        0 <= lc.beta_dpo_momentum < 1, "loss.beta_dpo_momentum", "a number in [0, 1)", lc.beta_dpo_momentum
    )
    p.expect(0 < cfg.loss.ld_alpha <= 1, "loss.ld_alpha", "a number in (0, 1] (1 = off)", cfg.loss.ld_alpha)

    t = cfg.training
    p.expect(t.global_batch_size >= 1, "training.global_batch_size", ">= 1", t.global_batch_size)
    p.expect(t.micro_batch_size >= 1, "training.micro_batch_size", ">= 1", t.micro_batch_size)
    p.expect(
        t.micro_batch_tokens >= 0, "training.micro_batch_tokens", "an integer >= 0", t.micro_batch_tokens
    )
    p.expect(t.epochs >= 1, "training.epochs", "an integer >= 1", t.epochs)
    p.expect(t.max_steps == -1 or t.max_steps >= 1, "training.max_steps", "-1 or >= 1", t.max_steps)
    p.expect(t.eval_interval_steps >= 0, "training.eval_interval_steps", ">= 0", t.eval_interval_steps)
    p.expect(t.max_skipped_steps >= 1, "training.max_skipped_steps", ">= 1", t.max_skipped_steps)

    o = cfg.optimizer
    p.expect(o.lr > 0, "optimizer.lr", "a number > 0", o.lr)
    p.expect(o.weight_decay >= 0, "optimizer.weight_decay", "a number >= 0", o.weight_decay)
    p.expect(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optimizer.betas",
        "two numbers in [0, 1)",
        o.betas,
    )
    p.expect(o.eps > 0, "optimizer.eps", "a number > 0", o.eps)
    p.expect(o.max_grad_norm >= 0, "optimizer.max_grad_norm", "a number >= 0", o.max_grad_norm)

    s = cfg.scheduler
    p.expect(s.warmup_steps >= 0, "scheduler.warmup_steps", "an integer >= 0", s.warmup_steps)
    p.expect(0 <= s.warmup_ratio < 1, "scheduler.warmup_ratio", "a number in [0, 1)", s.warmup_ratio)
    p.require(
        not (s.warmup_steps and s.warmup_ratio),
        "scheduler.warmup_steps and scheduler.warmup_ratio: set one of them, not both",
        "scheduler.warmup_steps",
        "scheduler.warmup_ratio",
    )
    p.expect(0 <= s.min_lr_ratio <= 1, "scheduler.min_lr_ratio", "a number in [0, 1]", s.min_lr_ratio)

    r = cfg.reference
    p.expect(r.batch_size >= 0, "reference.batch_size", ">= 0", r.batch_size)
    p.expect(r.sync_steps >= 0, "reference.sync_steps", "an integer >= 0 (0 = never)", r.sync_steps)
    p.expect(0 < r.sync_alpha <= 1, "reference.sync_alpha", "a number in (0, 1]", r.sync_alpha)
    p.require(
        r.sync_alpha == 1 or r.sync_steps > 0,
        f"reference.sync_alpha={r.sync_alpha} changes nothing: it needs reference.sync_steps > 0",
        "reference.sync_alpha",
        "reference.sync_steps",
    )
    p.require(
        r.sync_steps == 0 or r.mode == "live",
        'reference.sync_steps: TR-DPO updates a live reference; set reference.mode = "live"',
        "reference.sync_steps",
        "reference.mode",
    )
    p.require(
        r.sync_steps == 0 or not cfg.lora.enabled,
        "reference.sync_steps: with LoRA the reference is the base model (adapters off), which the "
        "policy never changes; TR-DPO needs full fine-tuning (lora.enabled = false)",
        "reference.sync_steps",
        "lora.enabled",
    )
    try:
        parse_size(cfg.export.max_shard_size)
    except ValueError:
        p.expect(False, "export.max_shard_size", 'a size like "5GB" or "500MiB"', cfg.export.max_shard_size)
    h = cfg.hub
    p.require(
        not h.push or bool(h.repo_id), "hub.repo_id: required when hub.push = true", "hub.repo_id", "hub.push"
    )
    p.require(
        not h.push or cfg.export.enabled,
        "hub.push: needs export.enabled = true (it uploads final/)",
        "hub.push",
        "export.enabled",
    )
    lo = cfg.lora
    p.expect(lo.r >= 1, "lora.r", "an integer >= 1", lo.r)
    p.expect(lo.alpha > 0, "lora.alpha", "a number > 0", lo.alpha)
    p.expect(0 <= lo.dropout < 1, "lora.dropout", "a number in [0, 1)", lo.dropout)
    p.expect(
        bool(lo.target_modules),
        "lora.target_modules",
        '"all-linear" or a list of module names',
        lo.target_modules,
    )
    pa = cfg.parallel
    p.expect(pa.replicate_degree >= 0, "parallel.replicate_degree", "an integer >= 0", pa.replicate_degree)
    p.expect(
        pa.collective_timeout_s >= 1, "parallel.collective_timeout_s", "seconds >= 1", pa.collective_timeout_s
    )
    p.expect(pa.sequence_parallel >= 1, "parallel.sequence_parallel", "an integer >= 1", pa.sequence_parallel)
    p.require(
        pa.sequence_parallel == 1 or not pa.compile,
        f"parallel.compile: not supported with parallel.sequence_parallel={pa.sequence_parallel} "
        "(the all-to-all of each attention is not traced)",
        "parallel.compile",
        "parallel.sequence_parallel",
    )
    p.expect(
        pa.activation_checkpointing_every >= 1,
        "parallel.activation_checkpointing_every",
        "an integer >= 1",
        pa.activation_checkpointing_every,
    )
    p.require(
        not pa.replicate_degree or pa.sharding == "hybrid",
        'parallel.replicate_degree: only used with parallel.sharding = "hybrid"',
        "parallel.replicate_degree",
        "parallel.sharding",
    )
    conflict = (pa.sharding == "grad_op" and pa.reshard_after_forward is True) or (
        pa.sharding in ("full", "hybrid") and pa.reshard_after_forward is False
    )
    p.require(
        not conflict,
        f"parallel.reshard_after_forward={str(pa.reshard_after_forward).lower()} conflicts with "
        f'parallel.sharding="{pa.sharding}" (leave it "auto")',
        "parallel.reshard_after_forward",
        "parallel.sharding",
    )
    c = cfg.checkpoint
    p.expect(c.interval_steps >= 0, "checkpoint.interval_steps", "an integer >= 0", c.interval_steps)
    p.expect(c.interval_epochs >= 0, "checkpoint.interval_epochs", "an integer >= 0", c.interval_epochs)
    p.expect(c.keep_last >= 0, "checkpoint.keep_last", "an integer >= 0", c.keep_last)
    p.expect(bool(c.resume), "checkpoint.resume", '"auto", "never" or a checkpoint path', c.resume)
    p.expect(cfg.logging.interval_steps >= 1, "logging.interval_steps", ">= 1", cfg.logging.interval_steps)
