"""Prompts beyond CLIP's 77 tokens: chunks of 75 tokens, each wrapped in begin and end tokens and encoded on
its own, their hidden states side by side (the U-Nets' context is dynamic), the negative prompt padded to
the same chunks; the same image as diffusers fed embeddings built that way, in process, batched and served."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import cli, diffusers_from_embeddings, levels
from helpers import close_to_diffusers as close

from voltacache.errors import InvalidRequest
from voltacache.pipeline.batching import StepBatcher
from voltacache.pipeline.stable_diffusion import StableDiffusion, Stats
from voltacache.request import Request
from voltacache.runtime.tokenizer import ClipTokenizer, check_prompt_length, pooled_chunks

# 150 tokens (two chunks); the shapes' words, so that the trained model's text encoder sees known tokens
LONG = ", ".join(["a red circle on a blue background"] * 18) + ", masterpiece"
WORDS = len(LONG.split())


def chunked_ids(tokenizer, text: str, chunks: int) -> list[list[int]]:
    """The reference's chunking, written from the issue's words with transformers' tokenizer: 75 tokens a
    chunk, begin and end tokens around each, padded with the tokenizer's pad token; empty chunks at the end."""
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    rows = []
    for k in range(chunks):
        part = tokens[75 * k : 75 * (k + 1)]
        row = [tokenizer.bos_token_id, *part, tokenizer.eos_token_id]
        rows.append(row + [tokenizer.pad_token_id] * (77 - len(row)))
    return rows


def reference_embeddings(pipe, texts: list[str]):
    """(embeddings, pooled) per text, diffusers' way per chunk (SD: the last hidden state; SDXL: both encoders'
    penultimate hidden states side by side, the second's projected pooled output of the first chunk)."""
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    counts = [len(t(x, add_special_tokens=False).input_ids) for t in tokenizers for x in texts]
    chunks = max(1, -(-max(counts) // 75))
    out = []
    with torch.no_grad():
        for text in texts:
            hidden, pooled = [], None
            for tokenizer, encoder in zip(tokenizers, encoders):
                ids = torch.tensor(chunked_ids(tokenizer, text, chunks))
                if len(encoders) == 1:
                    hidden.append(encoder(ids)[0].reshape(1, -1, encoder.config.hidden_size))
                    continue
                result = encoder(ids, output_hidden_states=True)
                hidden.append(result.hidden_states[-2].reshape(1, -1, encoder.config.hidden_size))
                pooled = result[0][:1]
            out.append((torch.cat(hidden, dim=-1), pooled))
    return out, chunks


def diffusers_long(pipe, prompt, negative, seed, steps=8):
    (positive, pooled), (negative_embeds, negative_pooled) = reference_embeddings(pipe, [prompt, negative])[0]
    return diffusers_from_embeddings(pipe, positive, negative_embeds, seed, steps, pooled, negative_pooled)


def test_chunks_are_diffusers_ids_and_a_short_prompt_is_one_chunk(tiny_pipe):
    ours = ClipTokenizer.from_transformers(tiny_pipe.tokenizer)
    short = "a photo of an astronaut riding a horse"
    theirs = tiny_pipe.tokenizer(short, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours([short]).tolist() == [theirs]
    exactly = " ".join(["horse"] * 75)  # 75 tokens: still one chunk, as today
    assert ours([exactly]).shape == (1, 77)
    ids = ours([short, LONG])  # two chunks per text: the short one's second is empty
    assert ids.shape == (4, 77)
    assert ids.tolist() == chunked_ids(tiny_pipe.tokenizer, short, 2) + chunked_ids(tiny_pipe.tokenizer, LONG, 2)


def test_long_prompt_equals_diffusers_fed_chunked_embeddings(sd, tiny_pipe):
    ours = sd(LONG, negative_prompt="blurry", steps=8, seed=3, scheduler="ddim").images[0]
    reference = diffusers_long(tiny_pipe, LONG, "blurry", seed=3)
    assert close(ours, reference)
    # and the long part counts: the first 75 tokens alone make another image
    first = tiny_pipe.tokenizer.decode(tiny_pipe.tokenizer(LONG, add_special_tokens=False).input_ids[:75])
    assert levels(ours, sd(first, negative_prompt="blurry", steps=8, seed=3, scheduler="ddim").images[0])[0] > 5


@pytest.mark.slow
def test_sdxl_long_prompt_equals_diffusers(sdxl_tiny):
    from voltacache.compile.checkpoint import load_pipeline

    model, engines = sdxl_tiny
    pipe = load_pipeline(model)
    sd = StableDiffusion.from_engines(engines)
    ours = sd(LONG, negative_prompt="blurry", steps=6, seed=5, scheduler="ddim").images[0]
    assert close(ours, diffusers_long(pipe, LONG, "blurry", seed=5, steps=6))


def test_a_long_negative_prompt_pads_the_prompt(sd, tiny_pipe):
    ours = sd("a red circle", negative_prompt=LONG, steps=6, seed=4, scheduler="ddim").images[0]
    assert close(ours, diffusers_long(tiny_pipe, "a red circle", LONG, seed=4, steps=6))


def test_prompt_beyond_the_bound_is_refused_in_one_line(sd, engines_dir, tmp_path):
    bound = sd.export.max_prompt_chunks * 75
    too_long = " ".join(["horse"] * (bound + 1))
    for fields in ({"negative_prompt": too_long}, {}):
        prompt = too_long if not fields else "a horse"
        name = "negative_prompt" if fields else "prompt"
        with pytest.raises(InvalidRequest, match=rf"^{name}: {bound + 1} tokens; these engines take up to {bound}"):
            sd(prompt, steps=2, **fields)
    # exactly the bound runs
    assert sd(" ".join(["horse"] * bound), steps=1, seed=0).images
    # the command: exit 2, one line, before the engines load
    result = cli("generate", too_long, "--engines", engines_dir, "--steps", "2", "-o", tmp_path / "a.png")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"up to {bound}" in result.stderr and not list(tmp_path.iterdir())


def test_engines_of_one_chunk_refuse_a_long_prompt_and_say_how_to_get_more(sd):
    with pytest.raises(InvalidRequest, match=r"export again \(--max-prompt-chunks\)"):
        check_prompt_length(sd.tokenizers, Request(LONG), 1)


def test_an_export_of_one_chunk_keeps_a_static_context(onnx_fp16_branch0):
    import onnx

    graph = onnx.load(str(onnx_fp16_branch0 / "unet_deep.onnx"), load_external_data=False).graph
    context = next(i for i in graph.input if i.name == "encoder_hidden_states")
    assert [d.dim_param or d.dim_value for d in context.type.tensor_type.shape.dim][1] == 77


def test_prompts_of_different_lengths_step_together_each_as_alone(sd):
    from test_batching import drain, submit

    requests = [
        Request(LONG, steps=6, seed=1, scheduler="ddim", cache_interval=2),
        Request("a red circle", steps=6, seed=2, scheduler="ddim", cache_interval=2),
        Request(LONG + ", " + LONG, steps=5, seed=3, scheduler="euler"),
    ]
    batcher, answers = StepBatcher(sd, capacity=3), {}
    tickets = [submit(batcher, sd, r, answers) for r in requests]
    drain(batcher)
    for ticket, request in zip(tickets, requests):
        result, error = answers[id(ticket)]
        assert error is None
        assert levels(result.images, np.stack([np.asarray(i) for i in sd(request).images]))[0] <= 1


def test_the_clip_cache_vector_reads_every_chunk(sd):
    """Two prompts alike in their first 75 tokens: the semantic cache tells them apart."""
    from voltacache.cache.embedders import ClipPooledEmbedder

    embedder = ClipPooledEmbedder(sd.export.geometry.pooled_dim)
    other = LONG.replace("masterpiece", "a green square on a yellow background, sketch")
    vectors = []
    for prompt in (LONG, other):
        _, pooled = sd.encode_prompt(Request(prompt), Stats())
        vectors.append(embedder.embed(prompt, pooled_chunks(pooled, 2 * sd.batch)[sd.batch]))
    assert float(vectors[0] @ vectors[1]) < 0.9999
    # a one-chunk prompt's vector is its pooled embedding, as before
    _, pooled = sd.encode_prompt(Request("a red circle"), Stats())
    one = embedder.embed("a red circle", pooled[sd.batch])
    assert np.allclose(one, pooled[sd.batch] / np.linalg.norm(pooled[sd.batch]), atol=1e-6)


def test_long_prompt_served_equals_in_process_and_over_the_bound_is_refused(triton, sd):
    from voltacache.serving.client import Client

    client = Client(triton.grpc_url)
    request = dict(negative_prompt="blurry", steps=6, seed=9, scheduler="ddim", cache_interval=2)
    served = client.generate(LONG, **request)
    assert np.array_equal(served.images[0], np.asarray(sd(LONG, **request).images[0]))
    too_long = " ".join(["horse"] * (sd.export.max_prompt_chunks * 75 + 1))
    with pytest.raises(InvalidRequest, match="these engines take up to"):
        client.generate(too_long, steps=2)
    assert client.generate("a red circle", steps=2, seed=1).images.shape[0] == 1  # serving on


@pytest.mark.parametrize("value", ["0", "17"])
def test_an_impossible_chunk_bound_is_refused_before_the_export(tmp_path, value):
    result = cli("export", "--model", tmp_path / "none", "--out", tmp_path / "out", "--max-prompt-chunks", value)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"--max-prompt-chunks {value}: use 1 to 16" in result.stderr and not (tmp_path / "out").exists()
