"""The offline character-level tokenizer: round trip, a real <unk>, <bos>, left padding, save and reload."""

from __future__ import annotations

import pytest

from rlsubnet.lab.tokenizer import BOS, DEFAULT_ALPHABET, EOS, PAD, UNK, build_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("text", ["12+34=46", "99-0=99", "0", " (1, 2)?: ", DEFAULT_ALPHABET])
def test_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character, after <bos>
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == BOS + text


def test_special_tokens_and_unknown_characters(tok):
    assert [tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token] == [PAD, UNK, BOS, EOS]
    assert len({tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id}) == 4
    ids = tok("1a+é")["input_ids"]
    assert ids[2] == tok.unk_token_id and ids[4] == tok.unk_token_id
    assert tok.pad_token_id not in ids  # unknown characters are not silently mapped to padding
    # <eos> written in text is one token, so the trainers can append it to completions
    assert tok("46" + EOS, add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id


def test_left_padding(tok):
    batch = tok(["1+2=", "12+34="], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1, 1]


def test_save_and_reload_offline(tok, tmp_path):
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    assert again.padding_side == "left"
    for text in ("12+34=46", "a?b"):
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.decode(again("7-3=4")["input_ids"], skip_special_tokens=True) == "7-3=4"


def test_repeated_alphabet_is_refused():
    with pytest.raises(ValueError):
        build_tokenizer("0123401")
