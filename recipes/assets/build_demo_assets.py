"""Regenerate the demo assets: preference pairs, a tiny tokenizer and a weightless Llama config.

Run from the repository root:

    python recipes/assets/build_demo_assets.py

Deterministic (fixed seed) and idempotent: every output below is rewritten from scratch.

Outputs (next to this script):
  demo_train.jsonl   ~2000 conversational preference pairs (sort a list of numbers)
  demo_eval.jsonl    128 held-out pairs whose prompts never occur in demo_train.jsonl
  tiny-llama/        config.json (LlamaConfig, no weights: use `model.random_init = true`),
                     generation_config.json and the tokenizer files (byte-level BPE + ChatML)

The task: the user asks to sort 4-7 distinct numbers (0-29) ascending; `chosen` is the ascending
order, `rejected` the same numbers in descending or a shuffled (never ascending) order. A tiny
transformer learns this preference from scratch in a few hundred DPO steps. Some prompts carry a
short system message or an earlier user/assistant turn, to exercise multi-turn prompts.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

SEED = 1234
HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "tiny-llama"
TRAIN_FILE = HERE / "demo_train.jsonl"
EVAL_FILE = HERE / "demo_eval.jsonl"
N_TRAIN = 2000
N_EVAL = 128

NUM_MAX = 29  # numbers are drawn from 0..NUM_MAX
MIN_LEN, MAX_LEN = 4, 7  # list lengths
REJECT_DESCENDING = 1 / 3  # shares of the rejected orders; the rest are random shuffles
REJECT_ONE_SWAP = 1 / 3
BPE_VOCAB_SIZE = 512  # upper bound, includes the special tokens; the corpus yields fewer merges

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

REQUESTS = [
    "sort: {}",
    "sort ascending: {}",
    "Sort these numbers: {}",
    "Please sort {} from smallest to largest.",
    "Put in increasing order: {}",
    "order these: {}",
]
SYSTEM_MESSAGES = [
    "You sort numbers.",
    "You are a helpful assistant.",
    "Answer with the numbers only.",
]


def fmt(nums: list[int]) -> str:
    return " ".join(str(n) for n in nums)


def draw_list(rng: random.Random) -> list[int]:
    return rng.sample(range(NUM_MAX + 1), rng.randint(MIN_LEN, MAX_LEN))


def rejected_order(rng: random.Random, nums: list[int]) -> list[int]:
    """A non-ascending order: descending, a random shuffle, or ascending with one adjacent swap."""
    ascending = sorted(nums)
    kind = rng.random()
    if kind < REJECT_DESCENDING:
        return ascending[::-1]
    if kind < REJECT_DESCENDING + REJECT_ONE_SWAP:
        out = ascending[:]
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
        return out
    while True:
        out = nums[:]
        rng.shuffle(out)
        if out != ascending and out != ascending[::-1]:
            return out


def make_pair(rng: random.Random) -> dict:
    nums = draw_list(rng)
    prompt: list[dict] = []
    kind = rng.random()
    if kind < 0.2:  # system message
        prompt.append({"role": "system", "content": rng.choice(SYSTEM_MESSAGES)})
    elif kind < 0.4:  # an earlier, correctly answered turn
        prev = rng.sample(range(NUM_MAX + 1), rng.randint(3, 4))
        prompt.append({"role": "user", "content": rng.choice(REQUESTS).format(fmt(prev))})
        prompt.append({"role": "assistant", "content": fmt(sorted(prev))})
    prompt.append({"role": "user", "content": rng.choice(REQUESTS).format(fmt(nums))})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": fmt(sorted(nums))}],
        "rejected": [{"role": "assistant", "content": fmt(rejected_order(rng, nums))}],
    }


def make_data() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    eval_pairs: list[dict] = []
    train_pairs: list[dict] = []
    eval_keys: set[str] = set()
    train_keys: set[str] = set()
    eval_lists: set[tuple[int, ...]] = set()
    # Held-out pairs first; training pairs never reuse a held-out prompt nor its final number set.
    while len(eval_pairs) < N_EVAL:
        pair = make_pair(rng)
        key = json.dumps(pair["prompt"])
        if key in eval_keys:
            continue
        eval_keys.add(key)
        eval_lists.add(tuple(sorted(int(x) for x in pair["chosen"][0]["content"].split())))
        eval_pairs.append(pair)
    while len(train_pairs) < N_TRAIN:
        pair = make_pair(rng)
        key = json.dumps(pair["prompt"])
        numbers = tuple(sorted(int(x) for x in pair["chosen"][0]["content"].split()))
        if key in train_keys or key in eval_keys or numbers in eval_lists:
            continue
        train_keys.add(key)
        train_pairs.append(pair)
    return train_pairs, eval_pairs


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def train_tokenizer(pairs: list[dict]) -> PreTrainedTokenizerFast:
    corpus = []
    for pair in pairs:
        corpus.append(render(pair["prompt"] + pair["chosen"]))
        corpus.append(render(pair["prompt"] + pair["rejected"]))
    # Every number with and without a leading space, so each one is a single token.
    corpus += [f"{n} {n}" for n in range(NUM_MAX + 1)] * 50

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=EOT,
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def check_tokenizer(folder: Path, pairs: list[dict]) -> bool:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ok = True
    for pair in pairs:
        for side in ("chosen", "rejected"):
            prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            ok &= full.startswith(prompt) and f_ids[: len(p_ids)] == p_ids and len(f_ids) > len(p_ids)
            ok &= full == render(pair["prompt"] + pair[side])
            ok &= tokenizer.decode(f_ids) == full
    return ok


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    train_pairs, eval_pairs = make_data()
    write_jsonl(TRAIN_FILE, train_pairs)
    write_jsonl(EVAL_FILE, eval_pairs)

    tokenizer = train_tokenizer(train_pairs)
    vocab = len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=(vocab + 7) // 8 * 8,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=ids[EOT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[EOT],
        use_cache=True,
    )
    config.architectures = ["LlamaForCausalLM"]
    generation = GenerationConfig(  # EOS is the tokenizer's (<|im_end|>), not its pad/bos (<|endoftext|>)
        bos_token_id=ids[EOT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[EOT],
        do_sample=False,
        max_new_tokens=32,
    )

    # Write into a fresh temporary folder, then swap it in (no stale files survive).
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        staging = Path(tmp) / "tiny-llama"
        tokenizer.save_pretrained(staging)
        config.save_pretrained(staging)
        generation.save_pretrained(staging)
        if MODEL_DIR.exists():
            shutil.rmtree(MODEL_DIR)
        shutil.move(str(staging), MODEL_DIR)

    loaded = AutoConfig.from_pretrained(MODEL_DIR)
    assert loaded.model_type == "llama" and loaded.vocab_size >= vocab
    ok = check_tokenizer(MODEL_DIR, train_pairs + eval_pairs)
    print(f"wrote {TRAIN_FILE.name} ({len(train_pairs)} pairs), {EVAL_FILE.name} ({len(eval_pairs)} pairs)")
    print(f"wrote {MODEL_DIR.name}/: {sorted(p.name for p in MODEL_DIR.iterdir())}")
    print(f"tokenizer: {vocab} tokens, config vocab_size {config.vocab_size}, special ids {ids}")
    print(f"chat-template prefix check (string and token level, all pairs): {'OK' if ok else 'FAILED'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
