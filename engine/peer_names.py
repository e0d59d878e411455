"""What TRL, open-instruct and torchtune call things, for the recipe's "did you mean" hints.

Pure data, read by engine.recipe when a recipe key or a loss name is unknown. `PEER_KEYS` maps a
peer's config name (bare, or `table.name` where a peer nests it in a table fsdpo also has) to
(fsdpo key or table, note); an empty key means fsdpo has no counterpart and the note says what
to do instead. Names that are fsdpo keys in another table (`beta` -> `loss.beta`, `seed`,
`max_length`, ...) need no entry: engine.recipe finds those in the schema itself.
tests/test_recipe_hints.py checks that every key and loss named here exists.
"""

from __future__ import annotations

_DERIVED_ACCUMULATION = "fsdpo derives accumulation steps = global_batch_size / (micro_batch_size x ranks)"
_MIXTURE = 'a list of sources, e.g. [{ path = "org/a", fraction = 0.5 }, { path = "org/b", count = 1000 }]'
_ADAMW = "fsdpo's optimizer is always AdamW: set optimizer.lr, optimizer.weight_decay, optimizer.betas, optimizer.eps"

PEER_KEYS: dict[str, tuple[str, str]] = {
    # batch and schedule (TRL / transformers TrainingArguments, open-instruct, torchtune)
    "learning_rate": ("optimizer.lr", ""),
    "per_device_train_batch_size": ("training.micro_batch_size", "pairs per rank per forward"),
    "batch_size": ("training.micro_batch_size", "pairs per rank per forward"),
    "gradient_accumulation_steps": ("training.global_batch_size", _DERIVED_ACCUMULATION),
    "num_train_epochs": ("training.epochs", ""),
    "num_epochs": ("training.epochs", ""),
    "max_train_steps": ("training.max_steps", ""),
    "max_steps_per_epoch": ("training.max_steps", "a total over all epochs"),
    "lr_scheduler_type": ("scheduler.type", '"constant", "linear" or "cosine"'),
    "lr_scheduler": ("scheduler", "type, warmup_steps, warmup_ratio, min_lr_ratio"),
    "num_warmup_steps": ("scheduler.warmup_steps", ""),
    "adam_beta1": ("optimizer.betas", "[beta1, beta2]"),
    "adam_beta2": ("optimizer.betas", "[beta1, beta2]"),
    "adam_epsilon": ("optimizer.eps", ""),
    "clip_grad_norm": ("optimizer.max_grad_norm", ""),
    "optim": ("", _ADAMW),
    "optimizer._component_": ("", _ADAMW),
    # precision, memory, parallelism
    "gradient_checkpointing": ("parallel.activation_checkpointing", 'set it to "full"'),
    "enable_activation_checkpointing": ("parallel.activation_checkpointing", 'set it to "full"'),
    "bf16": ("parallel.mixed_precision", '"bf16" ("auto" is bf16 on CUDA)'),
    "fp16": ("parallel.mixed_precision", 'fsdpo trains in "bf16" or "fp32", not fp16'),
    "dtype": ("parallel.mixed_precision", "the compute dtype (export.dtype is the saved weights' dtype)"),
    "torch_dtype": ("parallel.mixed_precision", "master weights stay fp32; this is the compute dtype"),
    "torch_compile": ("parallel.compile", ""),
    "fsdp": ("parallel.sharding", '"full", "grad_op", "hybrid" or "none"'),
    "deepspeed": ("parallel.sharding", '"full" = ZeRO-3, "grad_op" = ZeRO-2, "none" = DDP (FSDP2)'),
    "enable_activation_offloading": (
        "",
        "fsdpo has no activation offloading (parallel.cpu_offload offloads state)",
    ),
    "activation_offloading": ("", "fsdpo has no activation offloading (parallel.cpu_offload offloads state)"),
    "padding_free": ("training.forward_mode", '"packed" (or "prefix_shared")'),
    "packing": ("training.forward_mode", '"packed" (or "prefix_shared")'),
    "concatenated_forward": ("training.forward_mode", '"concatenated" or "separate"'),
    "device": ("", "ranks and devices come from torchrun (one GPU per rank)"),
    # loss
    "loss_type": ("loss.type", ""),
    "dpo_loss_type": ("loss.type", ""),
    "loss._component_": ("loss.type", 'a loss name such as "dpo"'),
    "loss_weights": ("loss.weights", ""),
    "dpo_beta": ("loss.beta", ""),
    "dpo_label_smoothing": ("loss.label_smoothing", ""),
    "dpo_gamma_beta_ratio": ("loss.gamma_beta_ratio", ""),
    "simpo_gamma": ("loss.gamma_beta_ratio", "SimPO's margin as gamma / beta"),
    "loss.gamma": ("loss.gamma_beta_ratio", "SimPO's margin as gamma / beta (RSOLoss's gamma is loss.beta)"),
    "loss.tau": ("loss.beta", "IPO's tau is loss.beta"),
    "rpo_alpha": ("loss.type", 'RPO is loss.type = ["dpo", "sft"] with loss.weights = [1.0, ALPHA]'),
    "cpo_alpha": (
        "loss.cpo_alpha",
        'the NLL weight of loss.type = "cpo"; CPO-SimPO is ["simpo", "sft"] with loss.weights = [1.0, ALPHA]',
    ),
    "use_weighting": ("loss.type", '"wpo"'),
    "reference_free": ("loss.type", 'a reference-free loss: "simpo", "orpo" or "cpo"'),
    "f_divergence_type": ("loss.f_divergence", ""),
    "f_alpha_divergence_coef": (
        "loss.f_alpha",
        "TRL 1.16's coefficient is 1 - loss.f_alpha (the paper's alpha)",
    ),
    "precompute_ref_log_probs": (
        "reference.cache_dir",
        'fsdpo precomputes reference log-probs, cached here (reference.mode = "cached", the default)',
    ),
    "precompute_ref_batch_size": ("reference.batch_size", ""),
    # TR-DPO (TRL) and TDPO (its authors' code, Vance0124/Token-level-Direct-Preference-Optimization)
    "sync_ref_model": (
        "reference.sync_steps",
        'TR-DPO: reference.mode = "live" with reference.sync_steps > 0 (0 = never)',
    ),
    "ref_model_sync_steps": (
        "reference.sync_steps",
        "TR-DPO's tau (TRL's default 512, fsdpo's 0 = never); needs reference.mode = \"live\"",
    ),
    "ref_model_mixup_alpha": (
        "reference.sync_alpha",
        "TR-DPO's alpha (TRL's default 0.6, fsdpo's 1: a copy)",
    ),
    "if_tdpo2": ("loss.type", '"tdpo" is TDPO2, "tdpo1" TDPO1'),
    "loss.alpha": ("loss.tdpo_alpha", "TDPO2's alpha (TRL CPOTrainer's AlphaPO alpha is loss.alphapo_alpha)"),
    # model, LoRA
    "model_name_or_path": ("model.path", ""),
    "model._component_": ("model.path", "a Hugging Face model folder or hub id"),
    "checkpointer": (
        "model.path",
        "the Hugging Face model folder (fsdpo's own checkpoints are [checkpoint])",
    ),
    "tokenizer": (
        "model.path",
        "the tokenizer is read from the model folder; max_seq_len is data.max_length",
    ),
    "tokenizer_name": ("model.path", "the tokenizer is read from the model folder"),
    "tokenizer_name_or_path": ("model.path", "the tokenizer is read from the model folder"),
    "use_flash_attn": ("model.attn_implementation", '"flash_attention_2"'),
    "use_peft": ("lora.enabled", ""),
    "use_lora": ("lora.enabled", ""),
    "lora_r": ("lora.r", ""),
    "lora_rank": ("lora.r", ""),
    "lora_alpha": ("lora.alpha", ""),
    "lora_dropout": ("lora.dropout", ""),
    "lora_target_modules": ("lora.target_modules", ""),
    "lora_attn_modules": ("lora.target_modules", ""),
    "apply_lora_to_mlp": ("lora.target_modules", '"all-linear" covers the MLP'),
    "lora_modules_to_save": ("lora.modules_to_save", ""),
    # data
    "dataset_name": ("data.train", 'a hub id or a local path, e.g. ["org/name"]'),
    "dataset": ("data.train", 'a hub id or a local path, e.g. ["org/name"]'),
    "dataset_mixer_list": ("data.train", _MIXTURE),
    "dataset_mixer": ("data.train", _MIXTURE),
    "dataset_train_split": (
        "data.train",
        'each source\'s split, e.g. [{ path = "org/name", split = "train_prefs" }]',
    ),
    "dataset_mixer_list_splits": (
        "data.train",
        'each source\'s split, e.g. [{ path = "org/name", split = "train_prefs" }]',
    ),
    "dataset_test_split": ("data.eval", 'e.g. [{ path = "org/name", split = "test_prefs" }]'),
    "dataset_config": (
        "data.train",
        'each source\'s subset, e.g. [{ path = "org/name", subset = "default" }]',
    ),
    "max_train_samples": ("data.train", 'each source\'s count, e.g. [{ path = "org/name", count = 1000 }]'),
    "max_seq_length": ("data.max_length", "prompt + completion tokens"),
    "max_seq_len": ("data.max_length", "prompt + completion tokens"),
    "max_completion_length": (
        "data.max_length",
        "fsdpo limits prompt + completion, and the prompt (data.max_prompt_length)",
    ),
    "truncation_mode": ("data.truncation", ""),
    "chat_template_name": ("data.chat_template", "the template text or a .jinja file"),
    "dataset_num_proc": ("data.num_proc", ""),
    "preprocessing_num_workers": ("data.num_proc", ""),
    "shuffle": ("", "fsdpo always shuffles, seeded by job.seed"),
    # job, logging, checkpoints, hub
    "data_seed": ("job.seed", "one seed for data order and initialisation"),
    "overwrite_output_dir": ("job.overwrite", ""),
    "logging_steps": ("logging.interval_steps", ""),
    "log_every": ("logging.interval_steps", ""),
    "log_every_n_steps": ("logging.interval_steps", ""),
    "report_to": ("logging.wandb", "true logs to Weights & Biases"),
    "with_tracking": ("logging.wandb", "true logs to Weights & Biases"),
    "metric_logger": ("logging.wandb", "true logs to Weights & Biases"),
    "wandb_project": ("logging.project", ""),
    "wandb_project_name": ("logging.project", ""),
    "wandb_entity": ("logging.entity", ""),
    "exp_name": ("logging.run_name", ""),
    "log_peak_memory_stats": ("", "peak memory is always logged (peak_mem_gib)"),
    "eval_steps": ("training.eval_interval_steps", ""),
    "eval_strategy": ("training.eval_interval_steps", ""),
    "save_steps": ("checkpoint.interval_steps", ""),
    "checkpointing_steps": ("checkpoint.interval_steps", ""),
    "checkpoint_every": ("checkpoint.interval_steps", '"epoch" is checkpoint.interval_epochs = 1'),
    "save_strategy": ("checkpoint.interval_steps", '"epoch" is checkpoint.interval_epochs = 1'),
    "save_total_limit": ("checkpoint.keep_last", ""),
    "keep_last_n_checkpoints": ("checkpoint.keep_last", ""),
    "resume_from_checkpoint": ("checkpoint.resume", '"auto", "never" or a step-N folder'),
    "push_to_hub": ("hub.push", ""),
    "hub_model_id": ("hub.repo_id", ""),
    "hf_repo_id": ("hub.repo_id", ""),
    "hub_private_repo": ("hub.private", ""),
}

# A peer's loss name (TRL `loss_type`, torchtune's loss class) -> (peer, fsdpo's name or "" if
# fsdpo lacks it). Names fsdpo shares (TRL's hinge, ipo, ..., open-instruct's dpo, dpo_norm,
# simpo, wpo) need no entry. torchtune names match the last part of `torchtune.rlhf.loss.X`.
PEER_LOSSES: dict[str, tuple[str, str]] = {
    "sigmoid": ("TRL", "dpo"),
    "sigmoid_norm": ("TRL", "dpo_norm"),
    "aot_pair": ("TRL", "aot_unpaired"),  # older TRL: the same sorted chosen vs rejected log-ratios
    "kto_pair": ("TRL", ""),
    "DPOLoss": ("torchtune", "dpo"),
    "RSOLoss": ("torchtune", "hinge"),
    "IPOLoss": ("torchtune", "ipo"),
    "SimPOLoss": ("torchtune", "simpo"),
}
