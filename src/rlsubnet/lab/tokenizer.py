"""An offline character-level tokenizer, saved and reloaded as a Hugging Face tokenizer.

Every character of the alphabet is one token; anything else maps to a real ``<unk>`` (never to padding, so an
unknown character is visible in the ids instead of silently vanishing from the loss). A template prepends
``<bos>`` to every sequence. Padding is on the left because the trainers and the evaluator generate in batches.
"""

from __future__ import annotations

from pathlib import Path

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
# Enough for every task in rlsubnet.lab.tasks, plus a little room so the vocabulary does not change when a task
# with a new operator is added.
DEFAULT_ALPHABET = "0123456789+-*=%<>(),.?: "


def build_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A ``PreTrainedTokenizerFast`` over ``alphabet``: ids 0-3 are <pad>, <unk>, <bos>, <eos>, then the characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # One pre-token per character; "isolated" keeps spaces as tokens instead of dropping them.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    tokenizer.save_pretrained(str(out_dir))


def load_tokenizer(path: str | Path):
    """Reload a tokenizer saved by :func:`save_tokenizer` (local files only, never the hub)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    tok.padding_side = "left"
    return tok
