"""Data formats: hand-checked token ids and label masks, awkward templates, malformed rows.

The tokenizer here is word-level with a vocabulary small enough to write ids by hand:
whitespace runs, words and punctuation are single tokens (see VOCAB), so every expected id
list below can be read off the rendered text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from engine.config import DataConfig, DataSource
from engine.data import build_dataset
from engine.errors import UserError
from engine.forward import padded_rows

VOCAB = [
    "<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "\n", "\n\n", " ", "system", "user", "assistant",
    "sort", "be", "tidy", ":", "1", "2", "3", "4", "9", "<s>", "Q", "A", "[INST]", "[/INST]",
]  # fmt: skip
ID = {w: i for i, w in enumerate(VOCAB)}
S, E, NL, SP = ID["<|im_start|>"], ID["<|im_end|>"], ID["\n"], ID[" "]
CHATML = (
    r"{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def word_tokenizer(template: str | None = CHATML, bos: bool = False) -> PreTrainedTokenizerFast:
    """ChatML-style word-level tokenizer: <|im_end|> is EOS; with `bos`, "<s>" starts each text."""
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", ID["<s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<s>", "[INST]", "[/INST]"],
    )
    tokenizer.chat_template = template
    return tokenizer


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def build(tmp_path: Path, rows: list, tokenizer=None, **settings):
    path = tmp_path / "d.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    cfg = DataConfig(
        max_length=settings.pop("max_length", 256), cache_dir=str(tmp_path / "cache"), **settings
    )
    return build_dataset([DataSource(path=str(path))], tokenizer or word_tokenizer(), cfg, 0)


def labels(pair) -> list[int]:
    """Training labels as the forward lays the pair out: -100 where nothing is scored."""
    inputs = padded_rows([(pair.prompt_ids, pair.chosen_ids)], ID["<pad>"], torch.device("cpu"))
    labels = [-100] * inputs.input_ids.shape[1]
    for position, target in zip(inputs.score_positions.tolist(), inputs.score_targets.tolist()):
        labels[position + 1] = target  # position t predicts token t + 1
    return labels


# ----------------------------------------------------------------------------------------------
# Every format, ids by hand


def test_standard_strings(tmp_path: Path) -> None:
    """BOS (added by the tokenizer) on the prompt only; completions tokenised alone, closed by EOS."""
    row = {"prompt": "sort 3 1", "chosen": " 1 3", "rejected": " 3 1"}
    pair = build(tmp_path, [row], word_tokenizer(bos=True)).pairs[0]
    assert pair.prompt_ids == [ID["<s>"], ID["sort"], SP, ID["3"], SP, ID["1"]]
    assert pair.chosen_ids == [SP, ID["1"], SP, ID["3"], E]
    assert pair.rejected_ids == [SP, ID["3"], SP, ID["1"], E]
    assert labels(pair) == [-100] * 6 + [SP, ID["1"], SP, ID["3"], E]


MULTI_TURN_PROMPT = [
    msg("system", "be tidy"),
    msg("user", "sort 3 1"),
    msg("assistant", "1 3"),
    msg("user", "sort 2 9 4"),
]
MULTI_TURN_PROMPT_IDS = [
    *[S, ID["system"], NL, ID["be"], SP, ID["tidy"], E, NL],
    *[S, ID["user"], NL, ID["sort"], SP, ID["3"], SP, ID["1"], E, NL],
    *[S, ID["assistant"], NL, ID["1"], SP, ID["3"], E, NL],  # an earlier assistant turn: prompt, not trained
    *[S, ID["user"], NL, ID["sort"], SP, ID["2"], SP, ID["9"], SP, ID["4"], E, NL],
    *[S, ID["assistant"], NL],  # the generation prompt
]  # fmt: skip


def test_conversational_multi_turn(tmp_path: Path) -> None:
    row = {
        "prompt": MULTI_TURN_PROMPT,
        "chosen": [msg("assistant", "2 4 9")],
        "rejected": [msg("assistant", "9 4 2")],
    }
    pair = build(tmp_path, [row]).pairs[0]
    assert pair.prompt_ids == MULTI_TURN_PROMPT_IDS
    # the final turn up to EOS; the template's newline after <|im_end|> is not trained
    assert pair.chosen_ids == [ID["2"], SP, ID["4"], SP, ID["9"], E]
    assert pair.rejected_ids == [ID["9"], SP, ID["4"], SP, ID["2"], E]
    assert labels(pair) == [-100] * len(MULTI_TURN_PROMPT_IDS) + pair.chosen_ids
    # a bare-string completion beside a message prompt is that assistant message
    same = build(tmp_path, [{**row, "chosen": "2 4 9", "rejected": "9 4 2"}]).pairs[0]
    assert same == pair


def test_implicit_prompt_multi_turn(tmp_path: Path) -> None:
    history = MULTI_TURN_PROMPT
    row = {"chosen": [*history, msg("assistant", "2 4 9")], "rejected": [*history, msg("assistant", "9 4 2")]}
    pair = build(tmp_path, [row]).pairs[0]
    assert pair.prompt_ids == MULTI_TURN_PROMPT_IDS
    assert pair.chosen_ids == [ID["2"], SP, ID["4"], SP, ID["9"], E]
    # UltraFeedback's layout: a string prompt beside whole conversations is ignored (auto format)
    assert build(tmp_path, [{"prompt": "sort 2 9 4", **row}]).pairs[0] == pair


def test_forced_format_and_column_names(tmp_path: Path) -> None:
    row = {
        "q": [msg("user", "sort 3 1")],
        "good": [msg("assistant", "1 3")],
        "bad": [msg("assistant", "3 1")],
    }
    columns = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    pair = build(tmp_path, [row], columns=columns, format="conversational").pairs[0]
    assert pair.prompt_ids == [
        S,
        ID["user"],
        NL,
        ID["sort"],
        SP,
        ID["3"],
        SP,
        ID["1"],
        E,
        NL,
        S,
        ID["assistant"],
        NL,
    ]
    assert pair.chosen_ids == [ID["1"], SP, ID["3"], E]
    with pytest.raises(UserError, match=r"row 0 \(line 1\): q: expected a string, got a list"):
        build(tmp_path, [row], columns=columns, format="standard")


# A template that renders the final assistant turn unlike the others: its content trimmed and no
# newline after <|im_end|>. Tokenising the completion's content alone (or rendering the
# completion message alone) would give other ids than the conversation the model is trained on.
FINAL_TURN_TEMPLATE = (
    r"{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}"
    r"{{ '<|im_start|>assistant\n' + m['content'] | trim + '<|im_end|>' }}"
    r"{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_rendering_the_final_turn_differently(tmp_path: Path) -> None:
    row = {
        "prompt": MULTI_TURN_PROMPT,
        "chosen": [msg("assistant", " 2 4 9 ")],
        "rejected": [msg("assistant", "9 4 2")],
    }
    pair = build(tmp_path, [row], word_tokenizer(FINAL_TURN_TEMPLATE)).pairs[0]
    assert pair.prompt_ids == MULTI_TURN_PROMPT_IDS
    assert pair.chosen_ids == [ID["2"], SP, ID["4"], SP, ID["9"], E]  # trimmed, as the template renders it
    naive = word_tokenizer()(" 2 4 9 ", add_special_tokens=False)["input_ids"] + [E]
    assert naive != pair.chosen_ids
    # the same template given as data.chat_template (a file) over a tokenizer without one
    (tmp_path / "t.jinja").write_text(FINAL_TURN_TEMPLATE)
    assert (
        build(tmp_path, [row], word_tokenizer(None), chat_template=str(tmp_path / "t.jinja")).pairs[0] == pair
    )


def test_generation_prompt_that_the_conversation_does_not_contain_is_a_hard_error(tmp_path: Path) -> None:
    """The generation prompt adds a blank line the rendered conversation lacks. Cutting the
    conversation's tokens at len(prompt tokens) would silently train on another prompt than the
    one used at inference; here it stops, even under on_bad_row = "skip"."""
    template = CHATML.replace(
        r"'<|im_start|>assistant\n' }}{% endif %}", r"'<|im_start|>assistant\n\n' }}{% endif %}"
    )
    row = {"prompt": [msg("user", "sort 3 1")], "chosen": "1 3", "rejected": "3 1"}
    with pytest.raises(UserError) as e:
        build(tmp_path, [row], word_tokenizer(template), on_bad_row="skip")
    assert "row 0" in str(e.value) and "not a prefix" in str(e.value) and "data.chat_template" in str(e.value)


def test_template_with_system_prompt_only_before_the_last_user_turn_is_a_hard_error(tmp_path: Path) -> None:
    """Mistral-style: the system prompt is printed with the last message only, so the prompt
    renders differently inside the whole conversation."""
    template = (
        r"{% for m in messages %}{% if m['role'] == 'user' %}{% if loop.last %}{{ 'sort ' }}{% endif %}"
        r"{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
        r"{{ ' ' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
    )
    row = {"prompt": [msg("user", "3 1")], "chosen": "1 3", "rejected": "3 1"}
    with pytest.raises(UserError, match="not a prefix of the whole conversation's rendering"):
        build(tmp_path, [row], word_tokenizer(template))


def test_completion_merging_with_the_prompt_is_a_bad_row(tmp_path: Path) -> None:
    """Text splits cleanly, tokens do not: "assistant\\n" + "\\n1 3" tokenises "\\n\\n" as one."""
    good = {"prompt": [msg("user", "sort 3 1")], "chosen": "1 3", "rejected": "3 1"}
    merging = {**good, "chosen": "\n1 3"}
    with pytest.raises(UserError, match=r"row 1 \(line 2\): chosen: the completion's first characters merge"):
        build(tmp_path, [good, merging])
    data = build(tmp_path, [good, merging], on_bad_row="skip")
    assert len(data) == 1 and data.stats["sources"][0]["filters"]["bad_row"] == {"dropped": 1, "left": 1}


def test_eos_closes_completions_and_template_text_after_it_is_dropped(tmp_path: Path) -> None:
    """A template whose turns end "<|im_end|>\\n\\n": the completion stops at EOS. One that writes
    no EOS at all gets one appended."""
    row = {"prompt": [msg("user", "sort 3 1")], "chosen": "1 3", "rejected": "3 1"}
    blank_line = CHATML.replace(r"'<|im_end|>' + '\n'", r"'<|im_end|>' + '\n\n'")
    assert build(tmp_path, [row], word_tokenizer(blank_line)).pairs[0].chosen_ids == [ID["1"], SP, ID["3"], E]
    no_eos = CHATML.replace(r"'<|im_end|>' + '\n'", r"'\n'")
    pair = build(tmp_path, [row], word_tokenizer(no_eos)).pairs[0]
    assert pair.chosen_ids == [ID["1"], SP, ID["3"], NL, E]


# ----------------------------------------------------------------------------------------------
# Filters and length policy


def test_filters_and_length_policy_are_counted(tmp_path: Path) -> None:
    p = [msg("user", "sort 3 1")]  # 13 prompt tokens with the generation prompt
    rows = [
        {"prompt": p, "chosen": "1 3", "rejected": "3 1"},  # kept
        {"prompt": p, "chosen": "  ", "rejected": "3 1"},  # empty (whitespace) completion
        {"prompt": p, "chosen": "1 3", "rejected": "1 3"},  # identical
        {"prompt": p, "chosen": "1 3 4", "rejected": "1 3 9"},  # identical once cut to 3 tokens
        {
            "prompt": [msg("user", "sort 3 1 2 4 9 1 2 3 4 9 1")],
            "chosen": "1",
            "rejected": "2",
        },  # long prompt
    ]
    data = build(tmp_path, rows, max_length=16)
    stats = data.stats["sources"][0]
    assert [(k, v["dropped"]) for k, v in stats["filters"].items()] == [
        ("bad_row", 0),
        ("empty_completion", 1),
        ("identical", 1),
        ("no_trainable_token", 1),
        ("identical_after_truncation", 1),
    ]
    assert stats["kept"] == len(data) == 1 and stats["truncated"] == {"prompt": 0, "completion": 1}
    assert data.pairs[0].chosen_ids == [ID["1"], SP, ID["3"]]  # cut from the end: no EOS
    # a prompt limit keeps the prompt's end (the generation prompt), then completions fit the rest
    cut = build(tmp_path, rows, max_length=16, max_prompt_length=4)
    long_prompt = cut.pairs[-1]
    assert long_prompt.prompt_ids == [E, NL, S, ID["assistant"], NL][-4:] and long_prompt.chosen_ids == [
        ID["1"],
        E,
    ]
    assert cut.stats["sources"][0]["truncated"]["prompt"] == 3
    # drop: any pair over a limit goes
    dropped = build(tmp_path, rows, max_length=17, truncation="drop")
    assert dropped.stats["sources"][0]["filters"]["too_long"]["dropped"] == 2 and len(dropped) == 1


# ----------------------------------------------------------------------------------------------
# Malformed rows: each gives its documented error, and is counted under "skip"

U, A = msg("user", "sort 3 1"), msg("assistant", "1 3")
BAD_ROWS = [
    ('{"prompt": "sort", "chosen": ', "not valid JSON"),
    ([1, 2], "expected a JSON object, got list"),
    ({"prompt": "sort", "chosen": "1"}, "missing column 'rejected'"),
    ({"chosen": "1", "rejected": "2"}, "missing column 'prompt'"),
    ({"prompt": 3, "chosen": [A], "rejected": [A]}, "prompt: expected a string or a list of messages, got a number"),
    ({"prompt": "sort", "chosen": "1", "rejected": [A]}, "both must be strings or both messages"),
    ({"prompt": [], "chosen": [A], "rejected": [A]}, "prompt: expected a non-empty list of messages"),
    ({"prompt": ["hi"], "chosen": [A], "rejected": [A]}, "prompt[0]: expected a message object, got a string"),
    ({"prompt": [{"role": "user"}], "chosen": [A], "rejected": [A]}, "prompt[0]: a message needs `role` and `content`"),
    ({"prompt": [{"from": "human", "value": "x"}], "chosen": [A], "rejected": [A]}, "ShareGPT-style"),
    ({"prompt": [msg("wizard", "x")], "chosen": [A], "rejected": [A]}, "prompt[0]: unknown role 'wizard'"),
    ({"prompt": [{"role": "user", "content": 7}], "chosen": [A], "rejected": [A]}, "prompt[0].content: expected a string, got a number"),
    ({"prompt": [U], "chosen": [A, A], "rejected": [A]}, "chosen: expected one assistant message, got roles ['assistant', 'assistant']"),
    ({"prompt": [U], "chosen": [U], "rejected": [A]}, "chosen: expected one assistant message, got roles ['user']"),
    ({"chosen": [U, A], "rejected": [U]}, "rejected: the conversation must end with an assistant turn, got 'user'"),
    ({"chosen": [U, A], "rejected": [msg("user", "other"), A]}, "chosen and rejected differ before the final assistant turn (message 0)"),
    ({"chosen": [A], "rejected": [msg("assistant", "2")]}, "chosen and rejected share no prompt"),
    ({"prompt": None, "chosen": [A], "rejected": "2"}, "chosen is a list but rejected is a string"),
    ({"prompt": [msg("system", "be tidy")], "chosen": [A], "rejected": "3 1"}, "the chat template rejected the conversation (no system prompts)"),
    ({"prompt": "", "chosen": "1", "rejected": "2"}, "prompt: tokenises to nothing"),
]  # fmt: skip
STRICT_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system prompts') }}{% endif %}" + CHATML
)


@pytest.mark.parametrize("row,problem", BAD_ROWS, ids=[p.split(":")[0][:40] for _, p in BAD_ROWS])
def test_bad_row_is_named_or_skipped(tmp_path: Path, row, problem: str) -> None:
    good = {"prompt": [U], "chosen": [A], "rejected": [msg("assistant", "3 1")]}
    rows = [good, good, row, good]  # the bad row is row 2, line 3
    tokenizer = word_tokenizer(STRICT_TEMPLATE)
    with pytest.raises(UserError) as e:
        build(tmp_path, rows, tokenizer)
    message = str(e.value)
    assert message.startswith(f"data.train[0] ({tmp_path / 'd.jsonl'}): row 2 (line 3): "), message
    assert problem in message and 'data.on_bad_row = "skip"' in message, message
    data = build(tmp_path, rows, tokenizer, on_bad_row="skip")
    stats = data.stats["sources"][0]
    assert len(data) == 3 and stats["filters"]["bad_row"] == {"dropped": 1, "left": 3}
    assert stats["bad_row_examples"] == [
        message.split(": ", 1)[1].removesuffix(' (data.on_bad_row = "skip" drops such rows)')
    ]
