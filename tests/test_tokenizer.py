"""Tokenizer: the released model's ids, round trips, and streaming that equals `decode`."""

import dataclasses
import io

import numpy as np
import pytest
import sentencepiece as spm
from conftest import TOKENIZER

from grok.config import GROK_1, GrokConfig
from grok.demo import DEMO_CONFIG, DEMO_TOKENIZER
from grok.errors import GrokError
from grok.tokenizer import Tokenizer, default_allowed

ANSWER = "The answer to life the universe and everything is of course"
ANSWER_IDS = [422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805]
# ASCII, precomposed accents, CJK and an emoji (4 UTF-8 bytes), double spaces, tab, newline.
TEXTS = [ANSWER, "naïve café 数字 🙂", "  two  spaces\tand\nnewline ", "𝔘𝔫𝔦 ꙮ 🙂🙃 \u0301x"]


@pytest.fixture(scope="module")
def real() -> Tokenizer:
    if not TOKENIZER.is_file():
        pytest.skip(f"released tokenizer not found at {TOKENIZER}")
    return Tokenizer.from_config(TOKENIZER, GROK_1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    """A 300-piece model trained in memory. The corpus has é and ï but no CJK or emoji, so
    those must go through byte-fallback pieces, several per character."""
    corpus = ["The quick brown fox jumps over the lazy dog.",
              "A naïve café serves crème brûlée.",
              "the answer to life, the universe and everything"] * 10
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=300, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    path.write_bytes(model.getvalue())
    return Tokenizer(path)


@pytest.fixture(params=["real", "tiny"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def pieces_of(tok: Tokenizer) -> spm.SentencePieceProcessor:
    """The same model, loaded directly, to look up pieces independently of the wrapper."""
    return spm.SentencePieceProcessor(model_file=tok.path)


def stream(tok: Tokenizer, ids) -> list[str]:
    decoder = tok.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_real_tokenizer_matches_release(real):
    assert real.encode(ANSWER) == ANSWER_IDS  # no BOS: the release does not prepend one
    assert real.decode(ANSWER_IDS) == ANSWER
    assert real.encode(ANSWER, add_bos=True) == [1, *ANSWER_IDS]
    assert (real.vocab_size, real.bos_id, real.pad_id, real.eos_id) == (131072, 1, 0, 2)
    assert real.decode(np.asarray(ANSWER_IDS, np.int32)) == ANSWER  # numpy ids accepted


def test_tiny_model_round_trips_non_ascii(tiny):
    for text in TEXTS:
        ids = tiny.encode(text)
        assert tiny.decode(ids) == text
    assert tiny.vocab_size == 300
    emoji = tiny.encode("🙂")
    # "▁" then the 4 UTF-8 bytes F0 9F 99 82, one byte-fallback piece each.
    assert [pieces_of(tiny).id_to_piece(i) for i in emoji] == [
        "▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_stream_concatenates_to_decode(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        # Valid text never shows a replacement character: partial bytes are held back.
        assert not any("\ufffd" in p for p in pieces)


def test_stream_holds_back_partial_characters(tiny):
    ids = tiny.encode("a🙂b")
    pieces = stream(tiny, ids)
    byte_run = [i for i, t in enumerate(ids) if pieces_of(tiny).is_byte(t)]
    assert len(byte_run) == 4
    # Nothing comes out until the 4th byte completes the emoji, which then comes out whole.
    assert [pieces[i] for i in byte_run] == ["", "", "", "🙂"]


def test_stream_first_piece_loses_its_space_later_ones_keep_it(real):
    space, the = pieces_of(real).piece_to_id(["▁", "▁The"])
    for ids, expected in [([the, the], ["The", " The", ""]),
                          ([space, the], ["", " The", ""]),  # SentencePiece strips only piece 0
                          ([real.bos_id, the, the], ["", "The", " The", ""])]:
        assert stream(real, ids) == expected
        assert "".join(expected) == real.decode(ids)


def test_stream_random_ids_equal_decode(tok):
    """Arbitrary id sequences, with control pieces, lone "▁", and byte pieces that form
    valid, truncated and invalid UTF-8: whatever `decode` says, the stream says too."""
    sp = pieces_of(tok)
    bytes_ = [i for i in range(tok.vocab_size) if sp.is_byte(i)]
    assert len(bytes_) == 256
    special = [tok.bos_id, tok.eos_id, sp.unk_id(), sp.piece_to_id("▁")]
    text_ids = tok.encode(" ".join(TEXTS))
    utf8 = [bytes_[b] for b in "é数🙂".encode()]
    pool = bytes_ + special * 20 + text_ids * 4 + utf8 * 20
    rng = np.random.default_rng(0)
    for _ in range(150):
        ids = [int(i) for i in rng.choice(pool, size=rng.integers(0, 25))]
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids


def test_flush_emits_incomplete_tail_and_resets(tiny):
    ids = tiny.encode("x🙂")[:-2]  # drop the emoji's last two bytes
    decoder = tiny.stream_decoder()
    pushed = "".join(decoder.push(i) for i in ids)
    assert pushed + decoder.flush() == tiny.decode(ids)
    assert tiny.decode(ids).endswith("\ufffd")
    # After a flush the decoder starts a new sequence (first piece's space stripped again).
    assert "".join(stream(tiny, tiny.encode(" ok"))) == tiny.decode(tiny.encode(" ok"))
    assert decoder.flush() == ""


def test_missing_and_garbage_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(ValueError, match=r"nope\.model.*does not exist.*SentencePiece model"):
        Tokenizer(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00 this is not a protobuf \xff" * 10)
    with pytest.raises(ValueError, match=r"garbage\.model.*could not be read.*SentencePiece"):
        Tokenizer(garbage)
    with pytest.raises(ValueError, match=r"could not be read"):
        Tokenizer(tmp_path)  # a directory


def test_bad_ids_and_inputs(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"token id 300 must lie in \[0, vocab_size=300\)"):
        tiny.decode([5, 300])
    with pytest.raises(ValueError, match=r"token id -1 must lie in"):
        tiny.stream_decoder().push(-1)
    with pytest.raises(ValueError, match=r"encode expects a str, got bytes"):
        tiny.encode(b"abc")
    with pytest.raises(ValueError, match=r"eos_id=300 must lie in \[0, vocab_size=300\)"):
        Tokenizer(tiny.path, eos_id=300)
    with pytest.raises(ValueError, match=r"pad_id must be an integer, got 0.5"):
        Tokenizer(tiny.path, pad_id=0.5)


# --- what a tokenizer cannot encode, and the tokens sampling leaves out -----------------

@pytest.fixture(scope="module")
def digits() -> Tokenizer:
    """The demo's tokenizer: digits, + and = only, no byte fallback."""
    return Tokenizer.from_config(DEMO_TOKENIZER, GrokConfig.from_json(DEMO_CONFIG))


def test_unencodable_characters_are_named(digits):
    with pytest.raises(GrokError) as e:
        digits.encode("1 2+x\n=")
    assert str(e.value) == (f"text '1 2+x\\n=' has characters the tokenizer "
                            f"{digits.path!r} cannot encode: ' ', 'x', '\\n' (expected only "
                            f"characters it has pieces for)")
    assert digits.encode("12+34=") == [5, 6, 14, 7, 8, 15]


def test_unencodable_message_is_bounded(digits):
    text = "".join(chr(0x4E00 + i) for i in range(500)) + "\x00"
    with pytest.raises(GrokError) as e:
        digits.encode(text)
    message = str(e.value)
    assert len(message) < 300 and message.isprintable(), message
    assert message.startswith(f"text {text[:40]!r}... has characters")
    assert "and 491 more" in message


def test_control_ids_and_the_default_mask(digits):
    assert digits.control_ids == [0, 1, 3]  # <pad>, <s>, <unk>; </s> (EOS) stays
    config = GrokConfig.from_json(DEMO_CONFIG)
    allowed = default_allowed(config, digits)
    assert allowed.shape == (16,) and np.flatnonzero(~allowed).tolist() == [0, 1, 3]
    # Without a tokenizer the config's pad alone is left out.
    assert np.flatnonzero(~default_allowed(config)).tolist() == [0]


def test_release_control_ids(real):
    # The release's tokenizer: [PAD], [BOS] and [UNK]; [EOS] ends rows.
    assert real.control_ids == [0, 1, 3]
    # A model vocabulary smaller than the tokenizer's (the tiny fixture pairs 4096 rows
    # with the full tokenizer) takes the ids that exist.
    small = dataclasses.replace(GROK_1, vocab_size=4096)
    assert np.flatnonzero(~default_allowed(small, real)).tolist() == [0, 1, 3]
