"""The CLIP tokenizer gives OpenAI's reference ids on every input (clip-anytorch's tokenizer)."""

import html
import importlib.util
import os
import random

import ftfy
import numpy as np
import pytest

import clipjax
from clipjax.data import tokenizer as tok

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def reference():
    """OpenAI's SimpleTokenizer, loaded from its file so that torch is never imported."""
    spec = importlib.util.find_spec("clip")
    if spec is None:
        pytest.skip("reference tokenizer (clip-anytorch, installed by the Makefile) is missing")
    path = os.path.join(list(spec.submodule_search_locations)[0], "simple_tokenizer.py")
    module_spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def reference_ids(reference, texts, context_length=77):
    """OpenAI's clip.tokenize(texts, context_length, truncate=True), without torch."""
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
        ids = [SOT] + reference.encode(text) + [EOT]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = EOT
        out[row, : len(ids)] = ids
    return out


def assert_same_ids(reference, texts, context_length=77):
    ours = tok.tokenize(texts, context_length=context_length)
    theirs = reference_ids(reference, texts, context_length)
    assert ours.dtype == np.int32 and ours.shape == (len(texts), context_length)
    bad = [t for t, a, b in zip(texts, ours, theirs) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} texts differ from the reference, e.g. {bad[:3]!r}"


TRICKY = [
    "",
    " ",
    "\t\n  \r\n",
    "a photo of a cat.",
    "A PHOTO OF A CAT!!!",
    "Hello, world... (really?) [yes] {no} <maybe> #tag @user $5 50% a+b=c ~/path/x_y-z",
    "it's they're we've I'm you'll he'd don't",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D DON'T",
    "'s's 'll'd ''m '",
    "rock 'n' roll o'clock ’s curly ‘quotes’ “double”",
    "café naïve résumé Ångström façade São Paulo Zürich",
    "e\u0301 combining acute, o\u0308 umlaut",
    "emoji 😀🐱‍👤👍🏽 🇯🇵 flags ❤️",
    "日本語のキャプション 中文字幕 한국어 캡션",
    "Ελληνικά ΣΑΣ ς русский текст עברית العربية हिन्दी ไทย",
    "İstanbul ß ǅ ﬁ ligature Ｆｕｌｌｗｉｄｔｈ",
    "Tom &amp; Jerry &quot;quoted&quot; &lt;b&gt; &#39;x&#39; &amp;amp; &nbsp;here &copy;",
    "AT&T R&D & friends &",
    "â€œmojibakeâ€\x9d donâ€™t cafÃ© Ã©tÃ©",
    "multiple     spaces\t\ttabs\n\nnewlines\u3000ideographic\xa0nbsp\u2028sep",
    "numbers 1234567890 3.14159 1,000,000 2nd 10th 1e-5 0x1F",
    "<|startoftext|> inside <|endoftext|> text <|ENDOFTEXT|>",
    "control\x00chars\x07here\x1b[31mred\x1b[0m \x7f",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "\ud83d\ude00 surrogate pair and lone \ud800 surrogate",
    "a" * 500,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["word"] * 100),
    "...!!!???---___***",
    "\U0001f600" * 40,
]


def test_tricky_inputs_match_reference(reference):
    assert_same_ids(reference, TRICKY)


@pytest.mark.parametrize("context_length", [2, 3, 8, 16, 77, 248])
def test_context_lengths_match_reference(reference, context_length):
    assert_same_ids(reference, TRICKY, context_length)


def random_unicode(rng: random.Random, n_chars: int) -> str:
    """Characters drawn from a mix of scripts, symbols, whitespace and arbitrary code points."""
    ranges = [
        (0x20, 0x7E),
        (0x00, 0x20),
        (0xA0, 0xFF),
        (0x100, 0x24F),
        (0x300, 0x36F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x600, 0x6FF),
        (0x900, 0x97F),
        (0x2000, 0x206F),
        (0x3000, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0xFF00, 0xFFEF),
        (0x1F300, 0x1FAFF),
        (0x0, 0x10FFFF),
    ]
    chars = []
    for _ in range(n_chars):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def test_random_unicode_matches_reference(reference):
    rng = random.Random(0)
    texts = [random_unicode(rng, rng.randint(0, 60)) for _ in range(1500)]
    assert_same_ids(reference, texts)


def generated_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = [
        "a dog",
        "The cat",
        "two children",
        "an old man",
        "A woman",
        "my friend's car",
        "Café owner",
        "the team",
        "3 birds",
        "a 1960s bus",
        "Zoë",
        "a red-tailed hawk",
    ]
    verbs = [
        "sitting on",
        "running across",
        "looking at",
        "is holding",
        "jumps over",
        "eating",
        "can't find",
        "we're near",
        "parked by",
        "flies above",
    ]
    objects = [
        "a wooden bench",
        "the beach at sunset",
        "a bowl of ramen 🍜",
        "New York City",
        "tall grass",
        "the snowy mountains",
        "a plate of crêpes",
        "Tom & Jerry posters",
        'a sign that says "STOP"',
        "the 2nd floor window",
        "東京タワー",
        "its reflection",
    ]
    tails = [
        "",
        ".",
        "!",
        " at night.",
        ", photo by @someone",
        " #nofilter",
        " (2019)",
        " -- stock image",
        "...",
        " &amp; more",
    ]
    out = []
    for _ in range(n):
        caption = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
        caption += rng.choice(tails)
        if rng.random() < 0.2:
            caption = caption.upper()
        if rng.random() < 0.1:
            caption = "  " + caption.replace(" ", "   ") + "\n"
        out.append(caption)
    return out


def test_generated_captions_match_reference(reference):
    assert_same_ids(reference, generated_captions(3000))


def test_long_captions_truncate_keeping_end_token(reference):
    texts = [" ".join(f"word{i}" for i in range(200)), "short one"]
    ids = tok.tokenize(texts, context_length=32)
    assert ids[0, -1] == EOT and ids[0, 0] == SOT and (ids[0] != 0).all()
    assert ids[1, 0] == SOT and (ids[1] == EOT).sum() == 1 and ids[1, -1] == 0
    np.testing.assert_array_equal(ids, reference_ids(reference, texts, 32))
    with pytest.raises(ValueError, match="texts\\[0\\].*context_length=32"):
        tok.tokenize(texts, context_length=32, truncate=False)


def test_plain_ascii_fast_path_equals_full_cleaning(reference):
    """The fast path may skip ftfy and HTML unescaping only where both change nothing."""
    rng = random.Random(1)
    alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(2000)]
    # Fragments that interact across chunk boundaries: contractions, specials, digits, punctuation.
    fragments = [
        "'s",
        "'T",
        "'re",
        "'VE",
        "'m",
        "'ll",
        "'d",
        "'",
        "''",
        "<|endoftext|>",
        "<|startoftext|>",
        "<|",
        "|>",
        "Dog",
        "cat",
        "x",
        "42",
        "7",
        "...",
        "-",
        ",",
        " ",
        " ",
        "   ",
    ]
    texts += [
        "".join(rng.choice(fragments) for _ in range(rng.randint(0, 25))) for _ in range(2000)
    ]
    texts += ["<b>bold</b> 'quoted' \"double\" `tick` \\u00e9 %20 +", " lead and trail  "]
    for text in texts:
        assert tok._is_plain_ascii(text)
        assert html.unescape(html.unescape(ftfy.fix_text(text))) == text
        assert reference.encode(text) == tok.default_tokenizer().encode(text)
    assert not tok._is_plain_ascii("a &amp; b")
    assert not tok._is_plain_ascii("tab\there")
    assert not tok._is_plain_ascii("café")


def test_single_string_and_top_level_alias(reference):
    ids = clipjax.tokenize("a diagram", context_length=10)
    assert ids.shape == (1, 10) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, reference_ids(reference, ["a diagram"], 10))
    assert tok.tokenize([]).shape == (0, 77)


def test_tiny_cache_gives_same_ids():
    small = tok.Tokenizer(cache_size=3)
    texts = generated_captions(200, seed=5)
    np.testing.assert_array_equal(small(texts), tok.tokenize(texts))
    assert len(small._cache) <= 3 + 2 and len(small._chunk_cache) <= 3


def test_decode_round_trip(reference):
    texts = ["a photo of a café 😀", "It's 日本語 &amp; more"]
    ids = tok.tokenize(texts)
    for row, text in zip(ids, texts):
        body = [int(i) for i in row if i not in (0, SOT, EOT)]
        assert tok.default_tokenizer().decode(row) == reference.decode(body).strip()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="context_length"):
        tok.tokenize(["x"], context_length=1)
    with pytest.raises(ValueError, match="context_length"):
        tok.tokenize(["x"], context_length=7.5)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        tok.tokenize(["ok", b"bytes"])


def test_vocab_is_consistent():
    t = tok.default_tokenizer()
    assert len(t.encoder) == tok.VOCAB_SIZE == 49408
    assert t.encoder["<|startoftext|>"] == SOT and t.encoder["<|endoftext|>"] == EOT
    assert sorted(set(tok.byte_symbols())) == sorted(tok.byte_symbols())  # 256 distinct symbols


def test_tokenize_tf_in_a_dataset():
    tf = pytest.importorskip("tensorflow")
    texts = generated_captions(10, seed=3) + ["café ☕ 日本"]
    expected = tok.tokenize(texts, context_length=20)

    ds = tf.data.Dataset.from_tensor_slices(texts).batch(4)
    ds = ds.map(lambda t: tok.tokenize_tf(t, context_length=20))
    assert ds.element_spec.shape.as_list() == [None, 20] and ds.element_spec.dtype == tf.int32
    np.testing.assert_array_equal(np.concatenate([b.numpy() for b in ds]), expected)

    scalar = tf.data.Dataset.from_tensor_slices(texts).map(
        lambda t: tok.tokenize_tf(t, context_length=20)
    )
    assert scalar.element_spec.shape.as_list() == [20]
    np.testing.assert_array_equal(np.stack([r.numpy() for r in scalar]), expected)

    invalid_utf8 = tok.tokenize_tf(tf.constant(b"bad \xff byte"), context_length=8).numpy()
    np.testing.assert_array_equal(invalid_utf8, tok.tokenize("bad \ufffd byte", 8)[0])
    with pytest.raises(ValueError, match="scalar or vector"):
        tok.tokenize_tf(tf.constant([["a"]]))
