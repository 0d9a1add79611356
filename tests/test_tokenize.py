"""The fast encoders give exactly the tokenizer's own ids, or they are not used."""

import pytest

from raycpt.core.data.tokenize import TiktokenBPE, choose_encoder, to_ragged, to_rows

# Text that stresses a byte-level BPE: contractions, digits, runs of spaces and newlines, accents, CJK, emoji,
# control bytes, an added token written inside the text, and code.
HARD_TEXTS = [
    "It's the model's job; they'll say we'd've known. I'M SURE they'RE fine.",
    "Prices rose 12.5% to $1,234,567.89 in Q3 2025 (vs. 0.07 a year ago) -- 3x!!",
    "  leading spaces,\ttabs\t\tand   runs   of spaces   \n\n\nthen blank lines\r\n   \n",
    "Café naïve résumé Ångström façade – em—dash “quotes” ‘single’ …",
    "日本語のテキストと中文文本, 한국어 텍스트, Ελληνικά, русский текст, العربية",
    "emoji 👩‍🔬🧬🚀 and flags 🇫🇷 and skin tones 👍🏽",
    "control\x04bytes\x06and\x13more\x7f and a null-ish \x01 char",
    "before<|endoftext|>after and <|endoftext|> again",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "word " * 300,
]


def test_tiktoken_path_matches_the_tokenizer_exactly(tokenizer):
    name, encode = choose_encoder(tokenizer, HARD_TEXTS)
    assert name == "tiktoken"  # GPT-2's byte-level BPE is the case the fast path exists for
    expected = tokenizer(HARD_TEXTS, add_special_tokens=False)["input_ids"]
    assert to_rows(encode(HARD_TEXTS)) == expected
    # the added token written in a text is matched as one token, as the tokenizer itself does
    assert tokenizer.eos_token_id in expected[HARD_TEXTS.index("before<|endoftext|>after and <|endoftext|> again")]


def test_the_chosen_encoder_gives_every_batch_the_tokenizer_ids(tokenizer):
    """The encoder is picked on a sample and then used on every batch, the sample's documents or not."""
    name, encode = choose_encoder(tokenizer, HARD_TEXTS[::3])
    assert name == "tiktoken"
    for batch in (HARD_TEXTS[:4], HARD_TEXTS[4:7], HARD_TEXTS[7:]):
        assert to_rows(encode(batch)) == tokenizer(batch, add_special_tokens=False)["input_ids"]


def test_an_encoder_that_disagrees_on_the_sample_is_not_used(tokenizer, monkeypatch):
    def off_by_one(self, reference):
        return lambda texts: to_ragged([[i + 1 for i in ids] for ids in to_rows(reference(texts))])

    monkeypatch.setattr(TiktokenBPE, "encoder", off_by_one)
    name, encode = choose_encoder(tokenizer, HARD_TEXTS)
    assert name.startswith("tokenizers") and "tiktoken: ids differ" in name  # it says why tiktoken was passed over
    assert to_rows(encode(HARD_TEXTS)) == tokenizer(HARD_TEXTS, add_special_tokens=False)["input_ids"]


def test_non_byte_level_tokenizer_falls_back_and_stays_exact():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in HARD_TEXTS for w in text.lower().split()})
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    assert TiktokenBPE.from_tokenizer(word_level) is None
    name, encode = choose_encoder(word_level, HARD_TEXTS)
    assert name.split(" ")[0] in ("tokenizers", "transformers") and "tiktoken: not a plain byte-level BPE" in name
    assert to_rows(encode(HARD_TEXTS)) == word_level(HARD_TEXTS, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("sample_size", [0, 1])
def test_empty_input_and_tiny_samples(tokenizer, sample_size):
    _, encode = choose_encoder(tokenizer, HARD_TEXTS[:sample_size])
    flat, lengths = encode([])
    assert flat.size == 0 and len(lengths) == 0
    assert to_rows(encode(HARD_TEXTS)) == tokenizer(HARD_TEXTS, add_special_tokens=False)["input_ids"]


def test_documents_with_a_byte_the_fast_path_cannot_map_are_encoded_by_the_tokenizer(tokenizer):
    """SmolLM2's vocabulary lacks 21 single bytes: tiktoken would emit a rank with no id; such documents must come
    out exactly as the tokenizer encodes them (here byte 0x04 is made unmappable)."""
    from raycpt.core.data.tokenize import reference_encoder

    fast = TiktokenBPE.from_tokenizer(tokenizer)
    fast.rank_to_id = fast.rank_to_id.copy()
    fast.rank_to_id[0x04] = -1
    encode = fast.encoder(reference_encoder(tokenizer))
    assert to_rows(encode(HARD_TEXTS)) == tokenizer(HARD_TEXTS, add_special_tokens=False)["input_ids"]
