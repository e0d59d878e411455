"""FSDP units as torchtitan lays them out, and the recompute choices (parallel.py)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from engine.config import DataConfig, DataSource, ModelConfig, ParallelConfig
from engine.data import build_dataset, collate
from engine.forward import SequenceLogprobs, policy_logps
from engine.model import build_tokenizer, decoder_blocks
from engine.parallel import edge_units, parallelize
from tests.conftest import data_mesh

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tiny_model_dir: Path, small_data: dict):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    data = build_dataset([DataSource(path=str(small_data["train"]))], tokenizer, DataConfig(max_length=64), 0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), data


def _is_unit(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def test_units_are_embedding_blocks_and_norm_with_head(llama, world) -> None:
    lm, _ = llama
    model = parallelize(SequenceLogprobs(copy.deepcopy(lm)), ParallelConfig(), data_mesh(world), CPU)
    inner = model.causal_lm
    assert _is_unit(inner.get_input_embeddings())
    assert all(_is_unit(block) for block in decoder_blocks(model))
    assert _is_unit(inner.model.norm) and _is_unit(inner.lm_head)
    # the root holds no parameter of its own: every one is managed by an inner unit
    inner_params = {id(p) for m in model.modules() if m is not model and _is_unit(m) for p in m.parameters()}
    assert all(id(p) in inner_params for p in model.parameters())


def test_tied_embeddings_stay_in_one_unit() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    assert lm.lm_head.weight is lm.transformer.wte.weight
    assert edge_units(SequenceLogprobs(lm)) == ([], [])


def test_untied_gpt2_puts_the_position_embedding_on_the_input_side() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, tie_word_embeddings=False
    )
    lm = GPT2LMHeadModel(config)
    before, after = edge_units(SequenceLogprobs(lm))
    assert before == [lm.transformer.wte, lm.transformer.wpe]
    assert after == [lm.transformer.ln_f, lm.lm_head]


def _old_layout(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """The layout before torchtitan-style units: one unit per block, the root holding the rest."""
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
    return model


def _train(model: torch.nn.Module, data, mode: str, steps: int = 3) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        batch = collate(data, list(range(4 * step, 4 * step + 4)))
        out = policy_logps(mode, model, batch, 0, CPU)
        loss = -torch.nn.functional.logsigmoid(out.chosen_logps - out.rejected_logps).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", ["concatenated", "prefix_shared"])
def test_new_units_train_the_old_layouts_curve(llama, world, mode: str) -> None:
    lm, data = llama
    old = _train(_old_layout(SequenceLogprobs(copy.deepcopy(lm)), data_mesh(world)), data, mode)
    new = _train(
        parallelize(SequenceLogprobs(copy.deepcopy(lm)), ParallelConfig(), data_mesh(world), CPU), data, mode
    )
    assert old[0] != old[-1]  # the curve moves, so agreement means something
    torch.testing.assert_close(torch.tensor(new), torch.tensor(old), rtol=1e-6, atol=1e-6)


def _gradients(model: torch.nn.Module, data) -> dict[str, torch.Tensor]:
    batch = collate(data, list(range(6)))
    out = policy_logps("packed", model, batch, 0, CPU)
    (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
    return {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor()
        if hasattr(p.grad, "full_tensor")
        else p.grad
        for n, p in model.named_parameters()
    }


def test_recompute_choices_give_the_same_gradients(llama, world) -> None:
    lm, data = llama
    grads = {
        ac: _gradients(
            parallelize(
                SequenceLogprobs(copy.deepcopy(lm)),
                ParallelConfig(activation_checkpointing=ac),
                data_mesh(world),
                CPU,
            ),
            data,
        )
        for ac in ("none", "full", "selective")
    }
    for ac in ("full", "selective"):
        for name, g in grads["none"].items():
            assert g.abs().max() > 0, name
            torch.testing.assert_close(grads[ac][name], g, rtol=1e-6, atol=1e-7, msg=f"{ac}: {name}")


def test_selective_recompute_reruns_the_cheap_ops_but_no_matmul(llama) -> None:
    """Ops run during backward: full recompute re-runs each block's forward matmuls, selective
    re-runs none of them (their outputs were kept) but does re-run element-wise ops, which no
    recompute never does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from engine.parallel import apply_activation_checkpointing

    lm, data = llama
    batch = collate(data, list(range(4)))

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.counts: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    def backward_ops(ac: str) -> dict[str, int]:
        model = SequenceLogprobs(copy.deepcopy(lm))
        if ac != "none":
            apply_activation_checkpointing(model, ac, 1)
        out = policy_logps("concatenated", model, batch, 0, CPU)
        loss = out.chosen_logps.sum() - out.rejected_logps.sum()
        with CountOps() as counter:
            loss.backward()
        return counter.counts

    none, selective, full = backward_ops("none"), backward_ops("selective"), backward_ops("full")
    matmuls = ("mm", "addmm", "bmm")
    assert sum(selective.get(op, 0) for op in matmuls) == sum(none.get(op, 0) for op in matmuls)
    assert sum(full.get(op, 0) for op in matmuls) > sum(none.get(op, 0) for op in matmuls)
    recomputed = {op for op in selective if selective[op] > none.get(op, 0)}
    assert recomputed and not recomputed & set(matmuls), recomputed


def test_compile_without_a_compiler_is_refused_naming_the_compiler(monkeypatch) -> None:
    from engine.errors import UserError
    from engine.parallel import check_compiler

    monkeypatch.setattr("shutil.which", lambda name: None)
    for device_type, needs in (("cpu", "a C++ compiler"), ("cuda", "a C compiler")):
        with pytest.raises(UserError, match=re.escape(f"torch.compile on {device_type} needs {needs}")):
            check_compiler(ParallelConfig(compile=True), device_type)
    check_compiler(ParallelConfig(compile=False), "cuda")  # nothing asked, nothing checked


def test_the_compiler_check_comes_before_any_loading(
    tmp_path: Path, small_data: dict, monkeypatch, world
) -> None:
    """A model folder that does not exist would fail at loading: the compiler check fails first."""
    from engine.errors import UserError
    from engine.recipe import load_config
    from engine.trainer import Trainer
    from tests.conftest import base_tables, write_recipe

    monkeypatch.setattr("shutil.which", lambda name: None)
    tables = base_tables(tmp_path / "no-such-model", small_data, tmp_path / "out")
    tables["parallel"] = {"compile": True}
    with pytest.raises(UserError, match=r"^parallel\.compile"):
        Trainer(load_config(write_recipe(tmp_path / "r.toml", tables)), world)
