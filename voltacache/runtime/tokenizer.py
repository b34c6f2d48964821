"""CLIP's tokenizer as the text encoder takes it, read from the tokenizer.json an export writes with the
`tokenizers` library alone: transformers' import costs every served tokenizer and first image a second
(docs/benchmarks.md), and its fast CLIPTokenizer runs this same file."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import VoltacacheError
from ..specs import TEXT_IDS

MAX_LENGTH = 77  # CLIP's context; without it in the saved config truncation overflows (docs/platform.md)
# The tokenizer folders of a pipeline, an export and an engines folder, one per text encoder input (TEXT_IDS).
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")


class ClipTokenizer:
    """Prompts -> the text encoder's ids: CLIP's BPE, begin and end tokens, truncated and padded to the
    context with the model's pad token (OpenAI's CLIP pads with its end token, OpenCLIP with "!")."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, pad_token: str):
        self.max_length = max_length
        self.plain = Tokenizer.from_str(tokenizer.to_str())  # counts a prompt's tokens before truncation
        self.plain.no_truncation()
        self.plain.no_padding()
        self.fixed = Tokenizer.from_str(self.plain.to_str())
        self.fixed.enable_truncation(max_length)
        self.fixed.enable_padding(pad_id=self.fixed.token_to_id(pad_token), pad_token=pad_token, length=max_length)

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

    def __call__(self, texts: list[str]) -> np.ndarray:
        """The ids of `texts`, as the text encoder takes them (in process and in the Triton tokenizer alike);
        a longer prompt is truncated with a warning, as diffusers does."""
        encodings = self.fixed.encode_batch(texts)
        for text, encoding in zip(texts, encodings):
            if encoding.overflowing:
                n, length = len(self.plain.encode(text).ids), self.max_length
                warnings.warn(f"prompt of {n} tokens truncated to CLIP's {length}: {text[:60]!r}...", stacklevel=3)
        return np.asarray([encoding.ids for encoding in encodings], dtype=np.int32)


def text_encoder_feeds(tokenizers: list[ClipTokenizer], texts: list[str]) -> dict[str, np.ndarray]:
    """The text encoder's inputs for `texts`: the ids of each of the model's tokenizers (SDXL has two)."""
    return {name: tokenizer(texts) for name, tokenizer in zip(TEXT_IDS, tokenizers)}


def load_tokenizers(folder: Path, export) -> list[ClipTokenizer]:
    """The tokenizers an export or engines folder holds: one per text encoder input of its export (its
    runtime.manifests.ExportManifest)."""
    return [ClipTokenizer.from_folder(Path(folder) / name) for name in TOKENIZER_DIRS[: export.geometry.text_encoders]]
