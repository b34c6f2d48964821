"""Browsing the cache: the stored images nearest a prompt, the stored prompts nearest a partial one
(recommendations, as a user types), and what the cache holds, newest or most used first.

One model's entries only (its fingerprint), unexpired, and the same in process (`voltacache cache
search --cache-index`) and served (the cache_search model, which the denoiser answers: it is the one
process that holds a milvus-lite index). A `SearchQuery` carries a search everywhere, as `Request`
carries a generation; a `Found` is one entry as a person sees it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InvalidRequest
from ..request import RequestTensor, check_choice, check_int, check_text, decode_tensors, scalar
from ..specs import TensorSpec
from .store import LISTING_ORDERS

TEXT_MODES = ("images", "prompts")  # the modes that embed the query text
SEARCH_MODES = TEXT_MODES + LISTING_ORDERS
DEFAULT_TOP = 9  # the dream cacher's gallery: a 3 x 3 grid
MAX_TOP = 100
MAX_THUMBNAIL = 4096


@dataclass(frozen=True)
class SearchQuery:
    """`mode`: images (nearest `text`), prompts (the distinct stored prompts nearest `text`, without
    images: recommendations), newest or most-used (`text` unused). `thumbnail`: the longest side of
    each image returned, in pixels; 0 returns them as stored."""

    mode: str = "images"
    text: str = ""
    top: int = DEFAULT_TOP
    thumbnail: int = 0

    def replace(self, **changes) -> SearchQuery:
        return dataclasses.replace(self, **changes)

    @property
    def embeds(self) -> bool:
        return self.mode in TEXT_MODES

    def check(self) -> SearchQuery:
        check_choice("mode", self.mode, SEARCH_MODES)
        check_text("query", self.text)
        if self.embeds and not self.text.strip():
            raise InvalidRequest(f"query is empty: a {self.mode} search needs words to look near")
        check_int("top", self.top, 1, MAX_TOP)
        check_int("thumbnail", self.thumbnail, 0, MAX_THUMBNAIL)
        return self

    def to_triton(self) -> dict[str, np.ndarray]:
        return {t.tensor.name: t.encode(getattr(self, t.field)) for t in SEARCH_TENSORS}

    @classmethod
    def from_triton(cls, read) -> SearchQuery:
        """From the tensors `read(name)` returns (None when absent: the field's default)."""
        if read(SEARCH) is None:
            raise InvalidRequest("missing input SEARCH: images, prompts, newest or most-used")
        return cls(**decode_tensors(SEARCH_TENSORS, read))


# The search's tensors (the cache_search model's inputs and outputs).
SEARCH = "SEARCH"  # images | prompts | newest | most-used
QUERY = "QUERY"
TOP_K = "TOP_K"
THUMBNAIL = "THUMBNAIL"  # the longest side of each image returned, in pixels; 0: as stored
RESULTS = "RESULTS"  # one JSON record per entry found, best first
RESULT_IMAGES = "RESULT_IMAGES"  # uint8 (images, height, width, 3); a record's "image" indexes it
SEARCH_TENSORS = (
    RequestTensor("mode", scalar(SEARCH, "object"), optional=False),
    RequestTensor("text", scalar(QUERY, "object")),
    RequestTensor("top", scalar(TOP_K, "int32")),
    RequestTensor("thumbnail", scalar(THUMBNAIL, "int32")),
)
SEARCH_OUTPUTS = (TensorSpec(RESULTS, "object", (-1,)), TensorSpec(RESULT_IMAGES, "uint8", (-1, -1, -1, 3)))


@dataclass
class Found:
    """One stored generation as a search shows it. `similarity`: cosine to the query (0 for a
    listing); `params`: the request that made it (steps, guidance, size...); `image`: uint8
    (height, width, 3), the first of the entry's images, or None (recommendations)."""

    id: str
    prompt: str
    similarity: float
    seed: int
    created: float
    hits: int
    params: dict = field(default_factory=dict)
    image: np.ndarray | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "image"}


def search(cache, query: SearchQuery, pooled=None) -> list[Found]:
    """Run `query` on a RequestCache (its store, embedder and model). `pooled`: the query's pooled
    CLIP embedding (the conditional row), which the clip embedder reads. An empty cache finds nothing;
    a store that fails raises CacheUnavailable."""
    store, model = cache.store, cache.fingerprint
    if query.embeds:
        nearest = store.nearest if query.mode == "images" else store.nearest_prompts
        hits = nearest(cache.embedder.embed(query.text, pooled), model, query.top)
        pairs = [(h.entry, h.similarity) for h in hits]
    else:
        pairs = [(entry, 0.0) for entry in store.listing(model, query.mode, query.top)]
    found = []
    for entry, similarity in pairs:
        image = None
        if query.mode != "prompts":
            image = stored_image(store, entry, query.thumbnail)
            if image is None:  # its blob is gone (the row is dropped): not shown
                continue
        found.append(
            Found(
                id=entry["id"],
                prompt=entry["prompt"],
                similarity=round(float(similarity), 6),
                seed=int(entry["seed"]),
                created=float(entry["created"]),
                hits=int(entry["hits"]),
                params=json.loads(entry["params"] or "{}"),
                image=image,
            )
        )
    return found


def stored_image(store, entry: dict, thumbnail: int) -> np.ndarray | None:
    from .layers import from_bytes
    from .store import Hit

    data = store.payload(Hit(entry["id"], 0.0, entry))
    if data is None:
        return None
    image = from_bytes(data)[0]
    return shrink(image, thumbnail) if thumbnail else image


def shrink(image: np.ndarray, side: int) -> np.ndarray:
    """`image` with its longest side at most `side` pixels (never enlarged)."""
    from PIL import Image

    height, width = image.shape[:2]
    scale = side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def to_triton(found: list[Found]) -> dict[str, np.ndarray]:
    """RESULTS (one JSON record each, whose "image" indexes RESULT_IMAGES, or is None) and RESULT_IMAGES."""
    images = [f.image for f in found if f.image is not None]
    records, index = [], 0
    for f in found:
        records.append(json.dumps(f.record() | {"image": None if f.image is None else index}).encode())
        index += f.image is not None
    pixels = np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)
    return {RESULTS: np.array(records, dtype=object), RESULT_IMAGES: pixels}


def from_triton(results: np.ndarray, images: np.ndarray) -> list[Found]:
    found = []
    for raw in results.reshape(-1):
        record = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        index = record.pop("image")
        found.append(Found(**record, image=None if index is None else images[index]))
    return found


class QueryEncoder:
    """The pooled CLIP embedding of a query text, made as a generation makes its prompt's: the
    engines' tokenizers, then a text-encoder runner (ONNX Runtime in process; a BLS call in the
    cache_search model)."""

    def __init__(self, tokenizers, text_encoder, batch: int):
        self.tokenizers, self.text_encoder, self.batch = tokenizers, text_encoder, batch

    @classmethod
    def from_engines(cls, engines) -> QueryEncoder:
        from ..runtime.engines import load_engines
        from ..runtime.manifests import read_engine_manifest
        from ..runtime.tokenizer import load_tokenizers
        from ..specs import TEXT_ENCODER

        export = read_engine_manifest(engines).export
        text_encoder = load_engines(engines, components=[TEXT_ENCODER]).runners[TEXT_ENCODER]
        return cls(load_tokenizers(engines, export), text_encoder, export.batch)

    def pooled(self, text: str) -> np.ndarray:
        """The text encoder's pooled output for Request(text).texts: every row, the negatives first."""
        from ..request import Request
        from ..runtime.tokenizer import text_encoder_feeds
        from ..specs import POOLED_EMBEDDING

        feeds = text_encoder_feeds(self.tokenizers, Request(text).texts(self.batch))
        return self.text_encoder.infer(feeds)[POOLED_EMBEDDING]

    def __call__(self, text: str) -> np.ndarray:
        """The conditional text's rows (one per chunk of a long text), which the clip embedder reads."""
        from ..runtime.tokenizer import pooled_chunks

        return pooled_chunks(self.pooled(text), 2 * self.batch)[self.batch]


def search_index(query: SearchQuery, index: str, blob_store=None, engines=None, embedder=None) -> list[Found]:
    """`query` in process, on the cache an index holds (its embedder read from the index); the
    entries of the engines' model, or of every model for a listing without `engines`."""
    from ..errors import UsageError
    from ..runtime.manifests import read_engine_manifest
    from .admin import open_existing
    from .embedders import make_embedder
    from .layers import RequestCache
    from .store import parse_collection

    if query.embeds and engines is None:
        raise UsageError("--engines: a search near a prompt needs the engines whose text encoder embeds it")
    fingerprint = read_engine_manifest(engines).export.fingerprint if engines is not None else None
    store = open_existing(index, blob_store, embedder)
    if store is None:  # the index holds no cache yet
        return []
    with store:
        name, dim = parse_collection(store.collection)
        pooled = QueryEncoder.from_engines(engines)(query.text) if query.embeds and name == "clip" else None
        return search(RequestCache(store, make_embedder(name, dim), fingerprint), query, pooled)
