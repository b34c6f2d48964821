"""Prompt weighting: A1111's syntax and compel's, read by compel's parser and weighed as compel weighs with the
same text encoder (PyTorch's in the reference, the engines' in ours), in process, batched and served."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import cli, diffusers_from_embeddings
from helpers import close_to_diffusers as close
from test_long_prompts import LONG

from voltacache.errors import InvalidRequest
from voltacache.pipeline.stable_diffusion import StableDiffusion
from voltacache.prompts import WeightedPrompt, parse, to_compel
from voltacache.request import Request


@pytest.mark.parametrize(
    "prompt, fragments",
    [
        ("a (red:1.3) circle", [("a", 1.0), ("red", 1.3), ("circle", 1.0)]),
        ("a (red) circle", [("a", 1.0), ("red", 1.1), ("circle", 1.0)]),
        ("a ((red)) circle", [("a", 1.0), ("red", 1.21), ("circle", 1.0)]),
        ("[red] circle", [("red", 1 / 1.1), ("circle", 1.0)]),
        ("(red circle:0.5), blue", [("red circle", 0.5), (", blue", 1.0)]),
        ("a (red)1.3 circle", [("a", 1.0), ("red", 1.3), ("circle", 1.0)]),  # compel's own
        ("a red++ circle", [("a", 1.0), ("red", 1.21), ("circle", 1.0)]),
        ("a red- circle", [("a", 1.0), ("red", 0.9), ("circle", 1.0)]),
    ],
)
def test_both_syntaxes_read_into_compels_fragments(prompt, fragments):
    parsed = parse(prompt)
    assert parsed.weighted and [t for t, _ in parsed.fragments] == [t for t, _ in fragments]
    assert np.allclose([w for _, w in parsed.fragments], [w for _, w in fragments], atol=1e-6)


@pytest.mark.parametrize(
    "prompt, text",
    [
        ("a red circle", "a red circle"),
        ("a well-lit room, 5-4", "a well-lit room, 5-4"),
        ("a \\(literal\\) word", "a (literal) word"),
        ("a \\[x\\]", "a [x]"),
    ],
)
def test_a_prompt_without_weights_is_read_as_typed(prompt, text):
    assert parse(prompt) == WeightedPrompt(text) or (parse(prompt).text == text and not parse(prompt).weighted)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a (red circle", r"unmatched '\(' at character 3; close it, or escape a literal one as \\\("),
        ("a red) circle", r"unmatched '\)' at character 6"),
        ("a [red) circle", r"unmatched '\)' at character 7"),
        ("a (red:1.3.4) circle", r"\(red:1.3.4\): a weight is a number, e.g. \(red:1.3\)"),
        ("a (red:-1) circle", r"\(red:-1\): use a weight from 0 to 100"),
        ('("a", "b").and()', r"compel's \.and\(\), \.blend\(\) and conjunctions are not supported"),
        ("a cat.swap(dog)", r"compel's \.swap\(\) \(cross-attention control\) is not supported"),
    ],
)
def test_malformed_weighting_is_refused_in_one_line(sd, prompt, message):
    with pytest.raises(InvalidRequest, match=rf"^prompt: {message}"):
        sd(prompt, steps=1)
    with pytest.raises(InvalidRequest, match=r"^negative_prompt: "):
        sd("a red circle", negative_prompt=prompt, steps=1)


def test_malformed_syntax_is_found_without_torch():
    """A1111's rewrite (the request's check) imports nothing heavy: the CLI refuses before torch loads."""
    import subprocess
    import sys

    code = (
        "import sys; from voltacache.request import Request\n"
        "try:\n    Request('a (red circle').check()\nexcept Exception as e:\n    print(type(e).__name__)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["InvalidRequest", "False"]


def compel_embeddings(pipe, prompt: str, negative: str):
    """compel's own (prompt, negative) embeddings from the pipeline's PyTorch text encoder(s), configured as
    voltacache weighs (REMOVE below 1, 75-token chunks), padded to the same length as compel pads them."""
    from compel import Compel, DownweightMode, ReturnedEmbeddingsType
    from compel.embeddings_provider import SplitLongTextMode

    xl = hasattr(pipe, "text_encoder_2")
    compel = Compel(
        tokenizer=[pipe.tokenizer, pipe.tokenizer_2] if xl else pipe.tokenizer,
        text_encoder=[pipe.text_encoder, pipe.text_encoder_2] if xl else pipe.text_encoder,
        truncate_long_prompts=False,
        downweight_mode=DownweightMode.REMOVE,
        split_long_text_mode=SplitLongTextMode.BRUTAL,
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        if xl
        else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED,
        requires_pooled=[False, True] if xl else False,
    )
    with torch.no_grad():
        if xl:
            (positive, pooled), (negative_embeds, negative_pooled) = compel(prompt), compel(negative)
        else:
            positive, negative_embeds = compel(prompt), compel(negative)
            pooled = negative_pooled = None
        positive, negative_embeds = compel.pad_conditioning_tensors_to_same_length([positive, negative_embeds])
    return positive, negative_embeds, pooled, negative_pooled


def diffusers_weighted(pipe, compel_prompt, compel_negative, seed, steps):
    positive, negative, pooled, negative_pooled = compel_embeddings(pipe, compel_prompt, compel_negative)
    return diffusers_from_embeddings(pipe, positive, negative, seed, steps, pooled, negative_pooled)


# (ours, the same in compel's syntax, written by hand)
WEIGHTED = [
    ("a (red:1.4) circle on a [blue] background", "a (red)1.4 circle on a (blue)0.9090909 background"),
    ("a red++ circle on a (blue background)0.6", "a red++ circle on a (blue background)0.6"),
    (LONG + ", (masterpiece:1.3)", LONG + ", (masterpiece)1.3"),  # three chunks, weights in the last
]


@pytest.mark.parametrize("prompt, compel_prompt", WEIGHTED)
def test_weighted_prompt_equals_diffusers_fed_compels_embeddings(sd, tiny_pipe, prompt, compel_prompt):
    ours = sd(prompt, negative_prompt="(blurry:1.2)", steps=6, seed=2, scheduler="ddim").images[0]
    reference = diffusers_weighted(tiny_pipe, compel_prompt, "(blurry)1.2", seed=2, steps=6)
    assert close(ours, reference)
    from voltacache.pipeline.stable_diffusion import Stats

    weighed, _ = sd.encode_prompt(Request(prompt, cache_mode="off"), Stats())
    plain, _ = sd.encode_prompt(Request(parse(prompt).text, cache_mode="off"), Stats())
    assert np.abs(weighed - plain).max() > 1e-2  # the weights did something


def test_an_escaped_parenthesis_is_the_literal_text(sd):
    from voltacache.pipeline.stable_diffusion import Stats

    request = Request("a \\(red\\) circle")
    assert request.texts(1) == ["", "a (red) circle"] and not any(p.weighted for p in request.weighted(1))
    escaped, _ = sd.encode_prompt(request, Stats())
    plain, _ = sd.encode_prompt(Request("a red circle"), Stats())
    assert not np.array_equal(escaped, plain)  # the parentheses are read as tokens, not as weights


@pytest.mark.slow
def test_sdxl_weighted_prompt_equals_diffusers(sdxl_tiny):
    from voltacache.compile.checkpoint import load_pipeline

    model, engines = sdxl_tiny
    pipe, sd = load_pipeline(model), StableDiffusion.from_engines(engines)
    prompt, compel_prompt = WEIGHTED[0]
    ours = sd(prompt, negative_prompt="(blurry:1.2)", steps=5, seed=4, scheduler="ddim").images[0]
    assert close(ours, diffusers_weighted(pipe, compel_prompt, "(blurry)1.2", seed=4, steps=5))


def test_weights_scope_the_cache(sd):
    weighted, plain = Request("a (red:1.4) circle", seed=1), Request("a red circle", seed=1)
    assert sd.cache_scope(weighted)["prompt_weights"] == [["a", 1.0], ["red", 1.4], ["circle", 1.0]]
    assert "prompt_weights" not in sd.cache_scope(plain)


def test_the_command_refuses_malformed_weights_before_the_engines_load(engines_dir, tmp_path):
    result = cli("generate", "a (red circle", "--engines", engines_dir, "--steps", "2", "-o", tmp_path / "a.png")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "unmatched '('" in result.stderr and not list(tmp_path.iterdir())


def test_weighted_prompt_served_equals_in_process_and_malformed_is_refused(triton, sd):
    from voltacache.serving import protocol as p
    from voltacache.serving.client import Client

    client = Client(triton.grpc_url)
    prompt = WEIGHTED[0][0]
    request = dict(negative_prompt="(blurry:1.2)", steps=6, seed=9, scheduler="ddim", cache_interval=2)
    served = client.generate(prompt, **request)
    assert np.array_equal(served.images[0], np.asarray(sd(prompt, **request).images[0]))
    with pytest.raises(InvalidRequest, match="unmatched"):
        client.generate("a (red circle", steps=2)
    # any client, past our client's own check: the server refuses it as INVALID_ARG and serves on
    bare = {p.PROMPT: np.array([b"a (red circle"], dtype=object)}
    with pytest.raises(Exception, match="unmatched"):
        client.infer(p.TXT2IMG, bare, [p.IMAGES])
    assert client.generate("a red circle", steps=2, seed=1).images.shape[0] == 1


def test_to_compel_keeps_compels_own_groups():
    assert to_compel("(a)1.2, (b)+, (c)") == "(a)1.2, (b)+, (c)1.1"
