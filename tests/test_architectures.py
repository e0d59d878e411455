"""Architectures: tiny pretrained folders of each family load shard by shard exactly as
`from_pretrained` loads them, train in every forward mode (step-0 loss ln 2, the modes agree) and
export to a folder with the file keys `save_pretrained` writes; sliding windows and logit
softcapping in the packed modes; dropout off by default.

Each model is saved with `save_pretrained`, so transformers' own file keys are on disk
(GPT-NeoX's `embed_out`, Mixtral's per-expert matrices), next to the demo tokenizer, whose
vocabulary (416 ids) every model here shares.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import metrics
from engine import trainer as trainer_module
from engine.attention import AttentionSegments, segment_attention
from engine.config import DataConfig, DataSource, LoraConfig, ModelConfig, ParallelConfig
from engine.data import PairBatch, build_dataset, collate
from engine.errors import UserError
from engine.export import full_hf_state_dict
from engine.forward import FORWARD_MODES, SequenceLogprobs, policy_logps
from engine.loading import hf_name, materialize_and_load
from engine.model import build_model, build_policy, build_tokenizer
from engine.parallel import parallelize
from engine.recipe import load_config
from tests.conftest import ASSETS, LN2, base_tables, data_mesh, train_rows, write_recipe

CPU = torch.device("cpu")
SIZES = dict(
    vocab_size=416, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
WINDOW = 8  # shorter than the training sequences (prompt + completion: 13 to 51 tokens)
ALTERNATING = {
    "head_dim": 8,
    "sliding_window": WINDOW,
    "layer_types": ["sliding_attention", "full_attention"],
}
# model_type -> (config fields beyond SIZES, attention kernel)
ARCHITECTURES: dict[str, tuple[dict, str]] = {
    "llama": ({}, "sdpa"),
    "qwen2": ({"tie_word_embeddings": True}, "sdpa"),
    "qwen3": ({"head_dim": 8}, "sdpa"),
    "mistral": ({"sliding_window": WINDOW}, "sdpa"),
    "gemma2": (ALTERNATING, "eager"),  # softcapped attention logits: transformers refuses sdpa
    "gemma3_text": (ALTERNATING, "sdpa"),
    "phi3": ({}, "sdpa"),
    "gpt2": ({}, "sdpa"),  # dropout 0.1 everywhere in its config (off by default in training)
    "gpt_neox": ({"tie_word_embeddings": False}, "sdpa"),
}
MIXTRAL = {"num_local_experts": 4, "num_experts_per_tok": 2}  # fused experts, saved per expert


def tiny_config(model_type: str, **fields):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**SIZES, **ARCHITECTURES.get(model_type, ({},))[0], **fields})


def save_tiny(out: Path, config) -> Path:
    """A random model of `config` saved with save_pretrained, with the demo tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so that log-probs vary (as in conftest)
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(ASSETS / "tiny-llama").save_pretrained(out)
    return out


def saved_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models' ops are tiny, and on a busy 2-core machine a second
    thread made them ~10x slower (as the torchrun tests' OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("architectures")
    dirs = {t: save_tiny(root / t, tiny_config(t)) for t in ARCHITECTURES}
    dirs["mixtral"] = save_tiny(root / "mixtral", tiny_config("mixtral", **MIXTRAL))
    return dirs


@pytest.fixture
def no_flops_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's matmul probe (an MFU denominator, ~1 s on a busy CPU) is of no use here."""
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device, dtype, size=2048: 1e12)


def _trainer(
    tmp_path: Path, model_dir: Path, data: dict, name: str, world, overrides=()
) -> trainer_module.Trainer:
    """3 steps of 4 pairs (12 pairs in all), no evaluation, no export unless asked."""
    tables = base_tables(model_dir, data, tmp_path / name)
    tables["data"].update(train=[{"path": str(data["train"]), "count": 12}], eval=[])
    tables["training"].update(global_batch_size=4, micro_batch_size=4, max_steps=3)
    tables["export"] = {"enabled": False}
    recipe = write_recipe(tmp_path / f"{name}.toml", tables)
    return trainer_module.Trainer(load_config(recipe, list(overrides)), world)


def _assert_loaded_like_from_pretrained(model: torch.nn.Module, model_dir: Path) -> None:
    """Every parameter of the sharded engine model equals from_pretrained's, bitwise."""
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    loaded = {hf_name(k): v for k, v in full_hf_state_dict(model).items()}
    names = {hf_name(n) for n, _ in model.named_parameters()}
    assert names and names <= loaded.keys()
    for name in names:
        assert torch.equal(loaded[name], expected[name]), name


def _assert_export_round_trips(trainer: trainer_module.Trainer, model_dir: Path) -> None:
    """final/ has the file keys save_pretrained wrote for the pretrained folder, and
    from_pretrained reads it back (nothing missing or unexpected) as the trained weights."""
    from transformers import AutoModelForCausalLM

    final = trainer.output_dir / "final"
    assert saved_keys(final) == saved_keys(model_dir)
    model, info = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    trained = {hf_name(k): v for k, v in full_hf_state_dict(trainer.model).items()}
    exported = model.state_dict()
    for name, _ in trainer.model.named_parameters():
        assert torch.equal(exported[hf_name(name)], trained[hf_name(name)]), name


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_loads_shard_by_shard_trains_in_every_mode_and_exports(
    tmp_path: Path, model_dirs: dict, small_data: dict, world, no_flops_probe, model_type: str
) -> None:
    model_dir, attn = model_dirs[model_type], ARCHITECTURES[model_type][1]
    curves = {}
    for mode in FORWARD_MODES:
        export = mode == "concatenated"
        trainer = _trainer(
            tmp_path, model_dir, small_data, mode, world,
            [f"training.forward_mode={mode}", f"model.attn_implementation={attn}", f"export.enabled={str(export).lower()}"],
        )  # fmt: skip
        if export:
            _assert_loaded_like_from_pretrained(trainer.model, model_dir)
        trainer.train()
        curves[mode] = [r["loss"] for r in train_rows(tmp_path / mode)]
        if export:
            _assert_export_round_trips(trainer, model_dir)
    for mode, curve in curves.items():
        assert len(curve) == 3 and abs(curve[0] - LN2) < 1e-6, (mode, curve)
        assert curve == pytest.approx(curves["concatenated"], rel=0, abs=1e-5), (mode, curves)
    assert abs(curves["concatenated"][-1] - LN2) > 1e-6, (
        curves
    )  # it trained (no update stays at ln 2 to 1e-7)


def test_converted_weights_load_and_export_as_transformers_does(
    tmp_path: Path, model_dirs: dict, small_data: dict, world, no_flops_probe
) -> None:
    """Mixtral: saved per expert, fused in the model (a transformers weight converter), loaded
    shard by shard and exported back per expert."""
    model_dir = model_dirs["mixtral"]
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in saved_keys(model_dir)
    trainer = _trainer(
        tmp_path, model_dir, small_data, "run", world, ["training.max_steps=1", "export.enabled=true"]
    )
    _assert_loaded_like_from_pretrained(trainer.model, model_dir)
    trainer.train()
    _assert_export_round_trips(trainer, model_dir)


def test_a_tied_weight_the_checkpoint_lacks_is_read_from_its_source(model_dirs: dict, world) -> None:
    """Qwen2 with tied embeddings, LoRA training a copy of the head (`modules_to_save`): the
    checkpoint has no lm_head.weight, so the copy starts from the embeddings, as in peft."""
    lora = LoraConfig(enabled=True, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    lm = build_policy(ModelConfig(path=str(model_dirs["qwen2"])), lora, seed=0, defer_weights=True)
    model = parallelize(SequenceLogprobs(lm), ParallelConfig(), data_mesh(world), world.device)
    materialize_and_load(model, model_dirs["qwen2"], world.device)
    state = full_hf_state_dict(model)
    copy = state["base_model.model.lm_head.modules_to_save.default.weight"]
    assert "lm_head.weight" not in saved_keys(model_dirs["qwen2"])
    assert torch.equal(copy, state["base_model.model.model.embed_tokens.weight"])
    assert copy.abs().sum() > 0


def test_a_missing_or_misshapen_weight_is_a_user_error(tmp_path: Path, model_dirs: dict, world) -> None:
    from safetensors.torch import load_file, save_file

    for change, words in (
        (lambda w: w.pop("embed_out.weight"), ["has no weight 'lm_head.weight'"]),
        (lambda w: w.update({"embed_out.weight": torch.zeros(3, 32)}), ["'lm_head.weight'", "[3, 32]"]),
    ):
        folder = save_tiny(tmp_path / "model", tiny_config("gpt_neox"))
        weights = load_file(folder / "model.safetensors")
        change(weights)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        lm = build_policy(ModelConfig(path=str(folder)), LoraConfig(), seed=0, defer_weights=True)
        model = parallelize(SequenceLogprobs(lm), ParallelConfig(), data_mesh(world), world.device)
        with pytest.raises(UserError) as error:
            materialize_and_load(model, folder, world.device)
        assert all(w in str(error.value) for w in ["model.path", *words]), error.value


@pytest.fixture(scope="module")
def long_batch(model_dirs: dict, small_data: dict) -> PairBatch:
    """8 demo pairs, every one longer than the window."""
    tokenizer = build_tokenizer(ModelConfig(path=str(model_dirs["mistral"])))
    data = build_dataset([DataSource(path=str(small_data["train"]))], tokenizer, DataConfig(max_length=64), 0)
    batch = collate(data, list(range(8)))
    assert (
        min(len(p) + min(len(c), len(r)) for p, c, r in zip(batch.prompts, batch.chosen, batch.rejected))
        > WINDOW
    )
    return batch


def _all_modes(model_dir: Path, attn: str, batch: PairBatch, **config) -> dict[str, torch.Tensor]:
    """Every mode's [chosen | rejected] log-probs of the folder's model (config fields replaced)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn, **config
    )
    model = SequenceLogprobs(lm)
    with torch.no_grad():
        out = {mode: policy_logps(mode, model, batch, 0, CPU) for mode in FORWARD_MODES}
    return {mode: torch.cat([o.chosen_logps, o.rejected_logps]) for mode, o in out.items()}


@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "gemma3_text"])
def test_packed_modes_honour_sliding_windows(
    model_dirs: dict, long_batch: PairBatch, model_type: str
) -> None:
    """Packed and prefix-shared log-probs equal the padded modes' (transformers' own window
    masks) with a window shorter than the sequences, on every layer (Mistral) or on alternate
    layers (Gemma 2 with softcapping, Gemma 3); and the window does change them."""
    attn = ARCHITECTURES[model_type][1]
    windowed = _all_modes(model_dirs[model_type], attn, long_batch)
    for mode, logps in windowed.items():
        torch.testing.assert_close(logps, windowed["concatenated"], rtol=1e-5, atol=1e-5, msg=mode)
    unwindowed = _all_modes(model_dirs[model_type], attn, long_batch, sliding_window=4 * WINDOW)
    assert (unwindowed["concatenated"] - windowed["concatenated"]).abs().max() > 1e-3


def test_segment_attention_with_a_window_equals_a_dense_mask() -> None:
    """Per-block windows (prefix sharing: rejected's window reaches back into its prompt) equal
    sdpa with the dense mask of each sequence's own positions."""
    torch.manual_seed(0)
    segments = AttentionSegments.for_shared_prefix([(6, 5, 4), (2, 9, 7)])
    n, window = segments.length, 4
    q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for start, stop, spans in segments.blocks:
        keys = [i for a, b in spans for i in range(a, b)]
        for j, query in enumerate(range(start, stop)):
            at = len(keys) - (stop - start) + j  # the query's position in its sequence
            for i, key in enumerate(keys):
                allowed[query, key] = at - window < i <= at
    # rejected's first token (row 11) sees the last 3 prompt tokens and itself, not chosen
    assert allowed[11].nonzero().flatten().tolist() == [3, 4, 5, 11]
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed
    ).transpose(1, 2)
    got = segment_attention(torch.nn.Module(), q, k, v, segments, sliding_window=window)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_dropout_is_off_by_default_and_on_when_asked(model_dirs: dict) -> None:
    """GPT-2 (dropout 0.1 in its config): two training-mode forwards agree by default, and the
    config's probabilities are 0; with model.disable_dropout = false they differ."""
    ids = torch.arange(3, 40)[None]
    for disable in (True, False):
        lm = build_model(ModelConfig(path=str(model_dirs["gpt2"]), disable_dropout=disable), seed=0).train()
        same = torch.equal(lm(ids).logits, lm(ids).logits)
        assert same == disable
        assert (lm.config.resid_pdrop == 0.0) == disable and (lm.config.attn_pdrop == 0.0) == disable


def test_an_attention_kernel_the_model_lacks_names_the_key(model_dirs: dict) -> None:
    with pytest.raises(UserError, match=r'^model\.attn_implementation: Gemma2ForCausalLM .*"eager"$'):
        build_model(ModelConfig(path=str(model_dirs["gemma2"]), attn_implementation="sdpa"), seed=0)
