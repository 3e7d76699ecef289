"""Offline helpers for demos and tests: a small tokenizer and random weights. Nothing here downloads.

`make_tokenizer()` trains a tiny deterministic byte-level BPE (vocabulary 120, ids 0..3 are
`<pad> <s> </s> <unk>`) with a chat template; `init_random_weights(model)` gives every parameter random values
(norms near their library init) so that a wrong weight shows up in the output.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

MAX_POSITIONS = 256
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, UNK_TOKEN_ID = 0, 1, 2, 3
TOKENIZER_VOCAB_SIZE = 120

# --------------------------------------------------------------------------- #
# Tokenizer                                                                    #
# --------------------------------------------------------------------------- #

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a little house on the hill, and in the house there lived an old man and his cat.
Every morning the man would open the window, look at the sea, and say: what a fine day it is!
The cat did not care about the sea. She wanted her breakfast, and she wanted it now.
Hello, how are you? I am fine, thank you. Where are you going? I am going to the market to buy bread.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.
Question: what is the capital of France? Answer: the capital of France is Paris.
We can stream the layers of a model from the disk, one layer at a time, and still get the same answer.
"""

#: Pre-tokenization regex of transformers' ``Qwen2Tokenizer`` (see :func:`_build_backend_tokenizer`).
_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

#: Base characters that always get their own token, so any ASCII prose encodes without ``<unk>``.
_ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyz")
    + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    + list("0123456789")
    + list(".,!?:;'\"-()\n")
)

#: A minimal chat format: ``<s>role: content\n ... assistant:``.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

#: Prompts of different lengths (the long one exceeds the Gemma-2 sliding window).
SAMPLE_PROMPTS: tuple[str, ...] = (
    "Hello, how are you?",
    "Once upon a time there was a little house on the hill,",
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
)


def _byte_level(text: str) -> str:
    """Return ``text`` in the GPT-2 byte-to-unicode alphabet (space -> ``"Ġ"``, newline -> ``"Ċ"``)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return "".join(piece for piece, _ in byte_level.pre_tokenize_str(text))


def _build_backend_tokenizer() -> Tokenizer:
    """Train a deterministic byte-level BPE on :data:`_CORPUS`.

    The pipeline (NFC, Qwen2 split regex, byte-level without prefix space) is exactly what
    transformers' ``Qwen2Tokenizer`` rebuilds from ``vocab``/``merges`` -- ``AutoTokenizer``
    forces that class for ``model_type == "qwen2"`` -- so the saved tokenizer encodes
    identically whichever class ends up loading it. Only the characters of :data:`_ALPHABET`
    and the space are in the vocabulary; other characters map to ``<unk>``.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = sorted(set(_byte_level("".join(_ALPHABET) + " ")))
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def make_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """Return a fresh offline tokenizer (vocabulary <= 120) with a chat template.

    Ids 0..3 are ``<pad>``, ``<s>``, ``</s>``, ``<unk>``; encoding prepends ``<s>``.
    It round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    backend = _build_backend_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side=padding_side,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()


@torch.no_grad()
def init_random_weights(model: PreTrainedModel, std: float = 0.02, norm_std: float = 0.1) -> None:
    """Overwrite every parameter of ``model`` with random values from the global RNG.

    Linear / embedding / expert / router weights and all biases: ``N(0, std)``.
    Norm weights: their library init (1, or 0 for Gemma's ``1 + w`` RMSNorm) plus
    ``N(0, norm_std)`` so scaling bugs are visible; norm biases ``N(0, std)``.
    Values are drawn in float32 and then cast, so the same seed gives the same
    weights (up to rounding) whatever the model dtype. Tied parameters are visited once.
    """
    seen: set[int] = set()
    for module in model.modules():
        norm = _is_norm(module)
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            noise = torch.randn(param.shape, dtype=torch.float32, device=param.device)
            if norm and pname == "weight":
                base = 1.0 if float(param.float().mean()) > 0.5 else 0.0
                param.copy_(base + norm_std * noise)
            else:
                param.copy_(std * noise)
