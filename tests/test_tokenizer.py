import importlib.util

import pytest

from voltacache.compile.clip_vocab import bpe_path, clip_tokenizer
from voltacache.runtime.tokenizer import MAX_LENGTH, ClipTokenizer

PROMPTS = [
    "a photo of an astronaut riding a horse",
    "A Photo Of An ASTRONAUT, riding a horse!!!",
    "portrait of a cat, 4k, (masterpiece:1.2), [detailed] -- by greg rutkowski; trending on artstation",
    "café naïve façade, crème brûlée",
    "東京の夜景 and a 🚀 over Zürich",
    "  lots   of\twhitespace\n here  ",
    "",
    "don't can't it's o'clock 1234567890 3.14",
]


@pytest.fixture(scope="module")
def reference():
    """open_clip's own SimpleTokenizer (openai/CLIP's code), loaded by path: open_clip's __init__ pulls torchvision."""
    spec = importlib.util.spec_from_file_location("openclip_tokenizer", bpe_path().parent / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(bpe_path()))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory.mktemp("tok"))


def test_known_ids(tokenizer):
    # the ids measured for CLIP (docs/platform.md)
    assert tokenizer("a photo of an astronaut riding a horse").input_ids == [
        49406,
        320,
        1125,
        539,
        550,
        18376,
        6765,
        320,
        4558,
        49407,
    ]


def test_vocabulary_size(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == MAX_LENGTH


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_ids_as_clip(tokenizer, reference, prompt):
    ours = tokenizer(prompt).input_ids
    theirs = [reference.sot_token_id, *reference.encode(prompt), reference.eot_token_id]
    assert ours == theirs
    assert ours[0] == 49406 and ours[-1] == 49407


def test_overlong_prompt_is_truncated_to_77(tokenizer):
    ids = tokenizer("a very long prompt " * 50, truncation=True, padding="max_length", max_length=MAX_LENGTH).input_ids
    assert len(ids) == 77
    assert ids[0] == 49406 and ids[-1] == 49407
    assert tokenizer("a very long prompt " * 50, truncation=True).input_ids[-1] == 49407


def test_padding_uses_end_token(tokenizer):
    ids = tokenizer("a cat", padding="max_length", max_length=MAX_LENGTH).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {49407}


@pytest.mark.parametrize("pad_token", [None, "!"])  # OpenAI's CLIP pads with its end token; OpenCLIP with "!"
def test_runtime_tokenizer_gives_transformers_ids(tmp_path, pad_token):
    """The runtime reads an export's tokenizer.json without transformers: a prompt that fits CLIP's context gets
    transformers' ids; a longer one, chunks of 75 tokens each wrapped and padded as transformers pads one."""
    theirs = clip_tokenizer(tmp_path / "cache", pad_token=pad_token)
    theirs.save_pretrained(tmp_path / "saved")  # as an export writes its tokenizer folder
    ours = ClipTokenizer.from_folder(tmp_path / "saved")
    fitting = [*PROMPTS, "photo " * 75]  # 77 tokens with its begin and end: it fits
    expected = theirs(fitting, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    long = "a very long prompt " * 50  # 200 tokens: three chunks
    tokens = theirs(long, add_special_tokens=False).input_ids
    chunked = [
        theirs.decode(tokens[k : k + 75]) for k in range(0, len(tokens), 75)
    ]  # each chunk's text, tokenized alone
    for tokenizer in (ours, ClipTokenizer.from_transformers(theirs)):
        assert tokenizer(fitting).tolist() == expected
        rows = tokenizer([long]).tolist()
        assert len(rows) == 3 and rows == theirs(chunked, padding="max_length", max_length=MAX_LENGTH).input_ids
        assert tokenizer(["photo " * 76]).shape == (2, MAX_LENGTH)  # one token more: a second chunk


def test_runtime_tokenizer_names_a_folder_without_its_file(tmp_path):
    from voltacache.errors import VoltacacheError

    with pytest.raises(VoltacacheError, match="no tokenizer.json"):
        ClipTokenizer.from_folder(tmp_path)
