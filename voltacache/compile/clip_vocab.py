"""The real CLIP tokenizer, built offline from the BPE file that open-clip-torch ships (for tiny models and
their pipelines; the runtime reads the tokenizer.json an export writes: voltacache.runtime.tokenizer).

No hub: vocab.json and merges.txt are written from `bpe_simple_vocab_16e6.txt.gz` the way
openai/CLIP builds its vocabulary, then loaded with transformers' CLIPTokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

from ..errors import VoltacacheError
from ..runtime.tokenizer import MAX_LENGTH

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# openai/CLIP keeps the first 49152 - 256 - 2 merges: 256 byte tokens + merges + 2 specials = 49408.
N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bpe_path() -> Path:
    """Locate open_clip's BPE file without importing open_clip (its import pulls torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise VoltacacheError(
            "the CLIP BPE file comes from open-clip-torch: install it with "
            "`pip install --no-deps open-clip-torch` (--no-deps: its torchvision pulls a CUDA torch)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise VoltacacheError(f"{path}: open-clip-torch is installed but its BPE file is missing")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256+n.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_tokenizer_files(out_dir: Path) -> None:
    """Write vocab.json, merges.txt and the configs that make `CLIPTokenizer.from_pretrained(out_dir)` CLIP's."""
    lines = gzip.open(bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    CLIPTokenizer.from_pretrained(out_dir, model_max_length=MAX_LENGTH).save_pretrained(out_dir)


def clip_tokenizer(cache_dir: Path | None = None, pad_token: str | None = None) -> CLIPTokenizer:
    """CLIP's tokenizer, built once into a cache folder and loaded from there after. `pad_token`: OpenCLIP's
    "!" (SD 2.x and SDXL's second tokenizer pad with it; OpenAI's CLIP pads with its end token)."""
    cache_dir = cache_dir or Path.home() / ".cache" / "voltacache" / "clip-tokenizer"
    if not (cache_dir / "tokenizer_config.json").is_file():
        write_tokenizer_files(cache_dir)
    return CLIPTokenizer.from_pretrained(cache_dir, **({"pad_token": pad_token} if pad_token else {}))
