"""The request-level cache: semantic hits (L1) and approximate starts (L2, after NIRVANA).

L1: a prompt whose embedding is within `semantic_threshold` of a stored one, with the same model
and generation parameters, gets the stored image: no denoising, no decode.
L2: a prompt in a lower similarity band starts from a stored intermediate latent of the best match,
K steps in, and runs the remaining steps with its own text embeddings. The closer the match, the
larger K. Each generation stores its latents after K = fraction x steps steps, for each fraction a
band can ask for.

Defaults, from measurements (docs/benchmarks.md). all-MiniLM-L6-v2's cosines: a paraphrase scores
0.96-0.97, a changed color or background 0.78-0.94 (median 0.86-0.89), a changed subject (cat/dog)
0.72-0.77, an unrelated prompt 0.1. So an image is served only at >= 0.95. The K bands were set by
quality on the trained shapes model (scripts/eval_shapes_quality.py): starting a one-word edit from
its neighbour's latent costs at most 2 points of adherence at K = 20% of the steps, and 3 to 12
points at 30%. Hence 20% from 0.90 and 10% from 0.80; nothing is reused below 0.80. NIRVANA's own
bands (up to 50% of the steps) are NIRVANA_BANDS, for `--cache-bands`.
"""

from __future__ import annotations

import dataclasses
import io
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VoltacacheError
from .store import NO_SEED, CacheStore, Hit, scope_key

IMAGE, LATENT = "image", "latent"
MODES = ("on", "off", "refresh")


NIRVANA_BANDS = "0.93:0.5,0.90:0.4,0.85:0.3,0.80:0.2,0.75:0.1"
DEFAULT_BANDS = "0.90:0.2,0.80:0.1"


def parse_bands(text: str) -> tuple[tuple[float, float], ...]:
    """ "0.90:0.2,0.80:0.1" -> ((0.9, 0.2), (0.8, 0.1)): minimum similarity and share of the steps skipped,
    best band first."""
    bands = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            similarity, fraction = (float(x) for x in item.split(":"))
        except ValueError:
            raise VoltacacheError(f"cache band {item!r}: write SIMILARITY:FRACTION, e.g. 0.90:0.2") from None
        if not (0 < similarity <= 1 and 0 < fraction < 1):
            raise VoltacacheError(f"cache band {item!r}: similarity in (0, 1], fraction of the steps in (0, 1)")
        bands.append((similarity, fraction))
    return tuple(sorted(bands, reverse=True))


@dataclass(frozen=True)
class CacheConfig:
    semantic_threshold: float = 0.95
    bands: tuple = parse_bands(DEFAULT_BANDS)

    @property
    def checkpoints(self) -> tuple[float, ...]:
        """The shares of the schedule after which a generation stores its latents: what the bands can ask for."""
        return tuple(sorted({fraction for _, fraction in self.bands}))


def skip_steps(similarity: float, steps: int, config: CacheConfig) -> int:
    """K for a match of this similarity: 0 when it is below every band."""
    for minimum, fraction in config.bands:
        if similarity >= minimum:
            return int(round(fraction * steps))
    return 0


def checkpoint_steps(steps: int, config: CacheConfig) -> set[int]:
    return {k for k in (int(round(f * steps)) for f in config.checkpoints) if 0 < k < steps}


@dataclass
class Decision:
    layer: str  # semantic | approximate | miss | off
    similarity: float = 0.0
    image: np.ndarray | None = None  # uint8 (batch, height, width, 3), for a semantic hit
    latent: np.ndarray | None = None  # for an approximate start
    start_step: int = 0
    seed: int | None = None  # the seed the served image was made with


def to_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def open_request_cache(
    index: str,
    blobs: str | None,
    embedder_name: str,
    fingerprint: str,
    clip_dim: int,
    config: CacheConfig = CacheConfig(),
    **store_options,
) -> RequestCache:
    """The cache for one model: index URI (a milvus-lite file path or a server URL) and blob store
    (a folder, default beside a file index, or s3://bucket/prefix)."""
    from .embedders import make_embedder

    embedder = make_embedder(embedder_name, clip_dim)
    if blobs is None:
        if "://" in index:
            raise ValueError("a Milvus server index needs --blob-store (a shared folder or s3://bucket/prefix)")
        blobs = str(Path(index).with_suffix("")) + "-blobs"
    store = CacheStore(index, blobs, dim=embedder.dim, embedder=embedder.name, **store_options)
    return RequestCache(store, embedder, fingerprint, config)


@dataclass
class CacheSettings:
    """Where the cross-request cache lives and how it behaves; `index` None: off. A deployment writes
    these into the denoiser's config (`parameters`), which reads them back (`from_parameters`).
    Several replicas share one cache by pointing at one Milvus server URL and one blob store (an S3
    bucket)."""

    index: str | None = None  # a milvus-lite file or a Milvus server URL
    embedder: str = "clip"
    blob_store: str | None = None
    ttl_s: float = 7 * 24 * 3600
    policy: str = "lcbfu"
    max_entries: int | None = None
    max_bytes: int | None = None
    semantic_threshold: float = CacheConfig.semantic_threshold
    bands: str = DEFAULT_BANDS

    def parameters(self) -> dict[str, str]:
        """As Triton model-config parameters (strings; local paths made absolute)."""
        if self.index is None:
            return {}
        absolute = lambda where: where if "://" in where else str(Path(where).resolve())  # noqa: E731
        values = {
            "cache_index": absolute(self.index),
            "cache_embedder": self.embedder,
            "cache_ttl_s": str(self.ttl_s),
            "cache_policy": self.policy,
            "cache_semantic_threshold": str(self.semantic_threshold),
            "cache_bands": ",".join(f"{similarity}:{fraction}" for similarity, fraction in parse_bands(self.bands)),
        }
        if self.blob_store:
            values["cache_blob_store"] = absolute(self.blob_store)
        for name in ("max_entries", "max_bytes"):
            if getattr(self, name) is not None:
                values[f"cache_{name}"] = str(getattr(self, name))
        return values

    @classmethod
    def from_parameters(cls, values: dict[str, str]) -> CacheSettings:
        """The inverse of `parameters`: each value converted to its field's type."""
        types = typing.get_type_hints(cls)
        given = {}
        for f in dataclasses.fields(cls):
            if f"cache_{f.name}" in values:
                convert = next(t for t in typing.get_args(types[f.name]) or (types[f.name],) if t is not type(None))
                given[f.name] = convert(values[f"cache_{f.name}"])
        return cls(**given)

    def open(self, fingerprint: str, clip_dim: int) -> RequestCache | None:
        """The cache for one model, or None when it is off."""
        if self.index is None:
            return None
        options = dict(ttl_s=self.ttl_s, policy=self.policy, max_entries=self.max_entries, max_bytes=self.max_bytes)
        config = CacheConfig(self.semantic_threshold, parse_bands(self.bands))
        return open_request_cache(self.index, self.blob_store, self.embedder, fingerprint, clip_dim, config, **options)


class RequestCache:
    def __init__(self, store: CacheStore, embedder, fingerprint: str, config: CacheConfig = CacheConfig()):
        self.store, self.embedder, self.fingerprint, self.config = store, embedder, fingerprint, config
        self.counts = {"semantic": 0, "approximate": 0, "miss": 0, "steps_skipped": 0}

    def scope(self, **params) -> str:
        return scope_key(self.fingerprint, **params)

    def lookup(self, vector, scope: str, steps: int, seed: int | None) -> Decision:
        semantic = self._best(self.store.search(vector, scope, IMAGE, seed=seed, limit=1))
        if semantic and semantic.similarity >= self.config.semantic_threshold:
            data = self.store.payload(semantic)
            if data is not None:
                self.store.touch(semantic)
                self.counts["semantic"] += 1
                self.counts["steps_skipped"] += steps
                return Decision("semantic", semantic.similarity, image=from_bytes(data), seed=semantic.entry["seed"])
        decision = self._approximate(vector, scope, steps)
        if decision.layer == "miss":
            self.counts["miss"] += 1
        return decision

    def _approximate(self, vector, scope: str, steps: int) -> Decision:
        # one search: the best match's checkpoints come back together (one row per checkpoint)
        hits = self.store.search(vector, scope, LATENT, limit=4 * len(self.config.checkpoints))
        best = self._best(hits)
        if best is None:
            return Decision("miss")
        k = skip_steps(best.similarity, steps, self.config)
        if k == 0:
            return Decision("miss", best.similarity)
        # the stored latent of that match at the largest checkpoint <= K
        candidates = [h for h in hits if h.entry["step"] <= k and h.similarity >= best.similarity - 1e-6]
        for hit in sorted(candidates, key=lambda h: -h.entry["step"]):
            data = self.store.payload(hit)
            if data is not None:
                self.store.touch(hit)
                self.counts["approximate"] += 1
                self.counts["steps_skipped"] += hit.entry["step"]
                return Decision("approximate", hit.similarity, latent=from_bytes(data), start_step=hit.entry["step"])
        return Decision("miss", best.similarity)

    @staticmethod
    def _best(hits: list[Hit]) -> Hit | None:
        return max(hits, key=lambda h: h.similarity, default=None)

    def checkpoints(self, steps: int) -> set[int]:
        return checkpoint_steps(steps, self.config)

    def remember(self, vector, scope: str, seed: int, steps: int, image: np.ndarray, latents: dict[int, np.ndarray]):
        """Store a finished generation: its image (L1) and its checkpoint latents (L2)."""
        entry = dict(vector=vector, scope=scope)
        self.store.put_many(
            [dict(entry, kind=IMAGE, payload=to_bytes(image), seed=seed, step=steps, benefit=steps)]
            + [
                dict(entry, kind=LATENT, payload=to_bytes(x), seed=NO_SEED, step=k, benefit=k)
                for k, x in latents.items()
            ]
        )
