"""CLIP's tokenizer as the text encoder takes it, read from the tokenizer.json an export writes with the
`tokenizers` library alone: transformers' import costs every served tokenizer and first image a second
(docs/benchmarks.md), and its fast CLIPTokenizer runs this same file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import InvalidRequest, VoltacacheError
from ..prompts import parse
from ..specs import TEXT_IDS

MAX_LENGTH = 77  # CLIP's context; without it in the saved config truncation overflows (docs/platform.md)
# The tokenizer folders of a pipeline, an export and an engines folder, one per text encoder input (TEXT_IDS).
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")


class ClipTokenizer:
    """Prompts -> the text encoder's ids: CLIP's BPE, in chunks of the context but its begin and end tokens
    (75 of CLIP's 77), each chunk wrapped in begin and end tokens and padded with the model's pad token
    (OpenAI's CLIP pads with its end token, OpenCLIP with "!"), as the community's tools encode long prompts
    (A1111, diffusers' long-prompt pipeline). A prompt that fits one chunk gets exactly diffusers' ids."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token: str):
        self.max_length = max_length
        self.chunk = max_length - 2  # a chunk's tokens between its begin and end tokens
        self.plain = Tokenizer.from_str(tokenizer.to_str())
        self.plain.no_truncation()
        self.plain.no_padding()
        begin_end = self.plain.encode("").ids  # the post-processor's [begin, end]
        if len(begin_end) != 2:
            raise VoltacacheError(f"a CLIP tokenizer adds a begin and an end token; this one adds {begin_end}")
        self.begin, self.end = begin_end
        self.pad = self.plain.token_to_id(pad_token)

    @classmethod
    def from_folder(cls, folder: Path) -> ClipTokenizer:
        """The tokenizer a pipeline's, an export's or an engines folder's tokenizer folder holds."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise VoltacacheError(f"{folder}: no tokenizer.json (an export of an older voltacache?): export again")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        pad = config.get("pad_token") or config["eos_token"]
        pad = pad["content"] if isinstance(pad, dict) else pad
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), config["model_max_length"], pad)

    @classmethod
    def from_transformers(cls, tokenizer) -> ClipTokenizer:
        """A diffusers pipeline's tokenizer (transformers' CLIPTokenizer runs a `tokenizers` backend)."""
        return cls(tokenizer.backend_tokenizer, tokenizer.model_max_length, tokenizer.pad_token)

    def tokens(self, texts: list[str]) -> list[list[int]]:
        """Each text's tokens, without begin and end tokens."""
        return [e.ids for e in self.plain.encode_batch(texts, add_special_tokens=False)]

    def chunks(self, tokens: int) -> int:
        """The chunks a text of this many tokens takes (an empty one: one)."""
        return max(1, -(-tokens // self.chunk))

    def __call__(self, texts: list[str], chunks: int | None = None) -> np.ndarray:
        """The ids of `texts`, as the text encoder takes them (in process and in the Triton tokenizer alike):
        `chunks` rows per text (default: as many as the longest text needs), text after text, a shorter
        text's last rows holding empty chunks (begin, end, padding)."""
        tokens = self.tokens(texts)
        chunks = chunks or max(self.chunks(len(t)) for t in tokens)
        ids = np.full((len(texts), chunks, self.max_length), self.pad, np.int32)
        for row, text in zip(ids, tokens):
            for chunk in range(chunks):
                part = text[chunk * self.chunk : (chunk + 1) * self.chunk]
                row[chunk, : len(part) + 2] = [self.begin, *part, self.end]
        return ids.reshape(len(texts) * chunks, self.max_length)


def prompt_chunks(tokenizers: list[ClipTokenizer], texts: list[str]) -> int:
    """The chunks of CLIP's context the longest of `texts` takes, by the longest of its tokenizations."""
    return max(t.chunks(len(tokens)) for t in tokenizers for tokens in t.tokens(texts))


def check_prompt_length(tokenizers: list[ClipTokenizer], request, max_chunks: int) -> None:
    """Refuse a prompt or negative prompt longer than the engines' context holds (export --max-prompt-chunks)."""
    if not tokenizers:
        return
    for name in ("prompt", "negative_prompt"):
        tokenizer, text = tokenizers[0], parse(getattr(request, name), name).text  # as the tokenizer reads it
        count = max(len(t.tokens([text])[0]) for t in tokenizers)
        if tokenizer.chunks(count) > max_chunks:
            limit = max_chunks * tokenizer.chunk
            more = "export with more --max-prompt-chunks" if max_chunks > 1 else "export again (--max-prompt-chunks)"
            raise InvalidRequest(
                f"{name}: {count} tokens; these engines take up to {limit} ({max_chunks} chunk(s) of "
                f"{tokenizer.chunk}): shorten it, or {more}"
            )


def text_encoder_feeds(tokenizers: list[ClipTokenizer], texts: list[str]) -> dict[str, np.ndarray]:
    """The text encoder's inputs for `texts`: the ids of each of the model's tokenizers (SDXL has two), as many
    chunks per text as the longest text takes in any of them (join_chunks undoes it)."""
    chunks = prompt_chunks(tokenizers, texts)
    return {name: tokenizer(texts, chunks) for name, tokenizer in zip(TEXT_IDS, tokenizers)}


def join_chunks(embeddings: np.ndarray, pooled: np.ndarray | None, texts: int):
    """The text encoder's output over a text_encoder_feeds call -> (each text's chunks' hidden states side by
    side, the U-Net's context; each text's pooled embedding, its first chunk's, as SDXL's long-prompt tools
    pool; every chunk's pooled embeddings, per text). No `pooled`: None for both."""
    chunks = len(embeddings) // texts
    context = embeddings.reshape(texts, chunks * embeddings.shape[1], *embeddings.shape[2:])
    if pooled is None:
        return context, None, None
    chunked = pooled_chunks(pooled, texts)
    return context, np.ascontiguousarray(chunked[:, 0]), chunked


def pooled_chunks(pooled: np.ndarray, texts: int) -> np.ndarray:
    """The text encoder's pooled rows over a text_encoder_feeds call -> (texts, chunks, dim)."""
    return pooled.reshape(texts, len(pooled) // texts, *pooled.shape[1:])


def load_tokenizers(folder: Path, export) -> list[ClipTokenizer]:
    """The tokenizers an export or engines folder holds: one per text encoder input of its export (its
    runtime.manifests.ExportManifest)."""
    return [ClipTokenizer.from_folder(Path(folder) / name) for name in TOKENIZER_DIRS[: export.geometry.text_encoders]]
