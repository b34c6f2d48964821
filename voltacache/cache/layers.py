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

The cache is an accelerator: `open_cache` reports an index or blob store that cannot be opened
once, through a `warn` callable, and returns None (generation goes on without it); a
`RequestCache` whose store fails mid-way reports it once the same way, and the request goes on as
a miss, without storing. Settings that cannot work are refused when `CacheSettings` is built.
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from ..errors import BadConfiguration
from .embedders import EMBEDDERS
from .policies import POLICIES
from .store import (
    IMAGE,
    LATENT,
    NO_SEED,
    CacheStore,
    Hit,
    default_blob_store,
    is_lite_index,
    is_server,
    reason,
    scope_key,
    unavailable,
)

INDEX_OPTION = "--cache-index"  # `deploy` calls it --cache
INDEX_SCHEMES = ("http", "https", "tcp")
RETRY_AFTER_S = 30.0  # after a failed lookup or store, the cache is skipped this long before it is tried again

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
            raise BadConfiguration(
                f"--cache-bands: cache band {item!r}: write SIMILARITY:FRACTION, e.g. 0.90:0.2"
            ) from None
        if not (0 < similarity <= 1 and 0 < fraction < 1):
            raise BadConfiguration(
                f"--cache-bands: cache band {item!r}: similarity in (0, 1], fraction of the steps in (0, 1)"
            )
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
    warn: Callable[[str], None] | None = None,
    **store_options,
) -> RequestCache:
    """The cache for one model: index URI (a milvus-lite path or a server URL) and blob store
    (a folder, default beside a milvus-lite index, or s3://bucket/prefix). Raises CacheUnavailable
    when the index or blob store cannot be opened; `open_cache` is the forgiving entry point."""
    from .embedders import make_embedder

    embedder = make_embedder(embedder_name, clip_dim)
    if blobs is None:
        if is_server(index):
            raise BadConfiguration(
                f"{INDEX_OPTION} {index}: a Milvus server index needs --blob-store (a shared folder or s3://bucket/prefix)"
            )
        blobs = default_blob_store(index)
    store = CacheStore(index, blobs, dim=embedder.dim, embedder=embedder.name, **store_options)
    return RequestCache(store, embedder, fingerprint, config, warn)


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

    def __post_init__(self):
        self.validate(paths=True)

    def validate(self, paths: bool) -> None:
        """Refuse, naming the option, what cannot work: here, not when a server loads the settings. `paths`:
        also what lies at the index's path now (a file, a folder of something else), which a server finds
        when it opens the cache (then it goes on without it) rather than when it reads its settings."""
        if isinstance(self.index, str) and self.index.strip().lower() in ("", "off", "none"):
            self.index = None
        if self.policy not in POLICIES:
            raise BadConfiguration(f"--cache-policy {self.policy!r}: choose one of {', '.join(POLICIES)}")
        if self.embedder not in EMBEDDERS:
            raise BadConfiguration(f"--cache-embedder {self.embedder!r}: choose one of {', '.join(EMBEDDERS)}")
        parse_bands(self.bands)
        if not (0 < self.semantic_threshold <= 1):
            raise BadConfiguration(f"--cache-threshold {self.semantic_threshold}: a cosine similarity in (0, 1]")
        if not (self.ttl_s > 0 and math.isfinite(self.ttl_s)):
            raise BadConfiguration(f"--cache-ttl {self.ttl_s}: seconds an entry may be served, more than 0")
        for name in ("max_entries", "max_bytes"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise BadConfiguration(f"--cache-{name.replace('_', '-')} {value}: a positive whole number, or none")
        if self.index is not None:
            self._check_locations(paths)

    def _check_locations(self, paths: bool = True):
        index, blobs = str(self.index), self.blob_store
        where = f"{INDEX_OPTION} {index}"  # deploy names its option --cache (cli.deploy rewords it)
        if is_server(index):
            url = urlparse(index)
            if url.scheme.lower() not in INDEX_SCHEMES or not url.hostname:
                raise BadConfiguration(
                    f"{where}: a Milvus server URL is http://HOST:PORT (or https://, tcp://); "
                    "a local index is a path ending in .db"
                )
            if not blobs:
                raise BadConfiguration(
                    f"{where}: a Milvus server index needs --blob-store (a folder every replica sees, "
                    "or s3://bucket/prefix)"
                )
        else:
            path = Path(index)
            if path.suffix != ".db":
                raise BadConfiguration(
                    f"{where}: a milvus-lite index is a path ending in .db, e.g. {path.stem or 'cache'}.db"
                )
            if paths and path.exists() and not path.is_dir():
                raise BadConfiguration(f"{where}: a file, not a milvus-lite index; name a new path ending in .db")
            if paths and path.is_dir() and not is_lite_index(path) and any(path.iterdir()):
                raise BadConfiguration(
                    f"{where}: an existing folder that is not a milvus-lite index; name a new path ending in .db"
                )
            for parent in path.parents if paths else ():
                if parent.exists():
                    if not parent.is_dir():
                        raise BadConfiguration(f"{where}: {parent} is a file, not a folder")
                    break
        blobs = blobs or (None if is_server(index) else default_blob_store(index))
        if blobs and "://" in blobs and not blobs.startswith("s3://"):
            raise BadConfiguration(f"--blob-store {blobs}: a folder or s3://bucket/prefix")
        if blobs and blobs.startswith("s3://") and not blobs[5:].split("/", 1)[0]:
            raise BadConfiguration(f"--blob-store {blobs}: name the bucket, s3://bucket/prefix")
        if paths and blobs and "://" not in blobs and Path(blobs).exists() and not Path(blobs).is_dir():
            option = "--blob-store" if self.blob_store else f"{where}: its blob folder"
            raise BadConfiguration(f"{option} {blobs}: an existing file, not a folder; name a folder")

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
                try:
                    given[f.name] = convert(values[f"cache_{f.name}"])
                except ValueError:
                    raise BadConfiguration(
                        f"parameter cache_{f.name} {values[f'cache_{f.name}']!r}: not a {convert.__name__}; "
                        "redeploy with `voltacache deploy`"
                    ) from None
        settings = cls.__new__(cls)  # checked when written; what lies at the path now is `open`'s concern
        for f in dataclasses.fields(cls):
            setattr(settings, f.name, given.get(f.name, f.default))
        settings.validate(paths=False)
        return settings

    def open(self, fingerprint: str, clip_dim: int, warn: Callable[[str], None] | None = None) -> RequestCache | None:
        """The cache for one model, or None when it is off; CacheUnavailable when it cannot be opened
        (`open_cache` reports that and goes on without it)."""
        if self.index is None:
            return None
        path = Path(self.index)  # something else may lie where the index was when it was deployed
        if not is_server(self.index) and path.exists() and not is_lite_index(path):
            if not path.is_dir():
                raise unavailable(self.index, "a file, not a milvus-lite index")
            if any(path.iterdir()):
                raise unavailable(self.index, "a folder that is not a milvus-lite index")
        options = dict(ttl_s=self.ttl_s, policy=self.policy, max_entries=self.max_entries, max_bytes=self.max_bytes)
        config = CacheConfig(self.semantic_threshold, parse_bands(self.bands))
        return open_request_cache(
            self.index, self.blob_store, self.embedder, fingerprint, clip_dim, config, warn, **options
        )


def warn_on_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def unavailable_warning(index: str, error: BaseException, during: str = "") -> str:
    why = f"{during} failed ({reason(error)})" if during else reason(error)
    return f"voltacache warning: cache {index} unavailable: {why}; generating without it"


def open_cache(
    settings: CacheSettings, fingerprint: str, clip_dim: int, warn: Callable[[str], None] = warn_on_stderr
) -> RequestCache | None:
    """The request cache the settings name, or None: when it is off, or when it cannot be opened
    (corrupt or unreadable index, Milvus server not answering within a few seconds, blob store not
    readable, milvus-lite index open in another process). That failure is reported once, as one
    line through `warn` ("voltacache warning: cache ... unavailable: ...; generating without it"),
    and the returned cache reports its own later failures through the same `warn`."""
    if settings.index is None:
        return None
    try:
        return settings.open(fingerprint, clip_dim, warn)
    except Exception as e:  # an accelerator: whatever failed, generation goes on without it
        warn(unavailable_warning(settings.index, e))
        return None


class RequestCache:
    """Lookups and stores for one model. Both fail soft: an exception in the store (index or blob
    store gone, server down) is reported once through `warn`, the lookup answers a miss and the
    store is skipped; for RETRY_AFTER_S after a failure the store is not tried (a server that does
    not answer costs one timeout per interval, not one per request). After it works again, a new
    failure is reported again."""

    def __init__(
        self,
        store: CacheStore,
        embedder,
        fingerprint: str,
        config: CacheConfig = CacheConfig(),
        warn: Callable[[str], None] | None = None,
    ):
        self.store, self.embedder, self.fingerprint, self.config = store, embedder, fingerprint, config
        self.warn = warn or warn_on_stderr
        self.counts = {"semantic": 0, "approximate": 0, "miss": 0, "steps_skipped": 0, "errors": 0}
        self.failed_at: float | None = None  # monotonic time of the last failure, None while it works

    def scope(self, **params) -> str:
        return scope_key(self.fingerprint, **params)

    def _soft(self, during: str, action: Callable, fallback):
        if self.failed_at is not None and time.monotonic() - self.failed_at < RETRY_AFTER_S:
            return fallback
        try:
            result = action()
        except Exception as e:
            self.counts["errors"] += 1
            if self.failed_at is None:
                self.warn(unavailable_warning(self.store.uri, e, during))
            self.failed_at = time.monotonic()
            return fallback
        self.failed_at = None
        return result

    def lookup(self, vector, scope: str, steps: int, seed: int | None) -> Decision:
        """A semantic hit, an approximate start or a miss; a miss too when the store fails."""
        return self._soft("a lookup", lambda: self._lookup(vector, scope, steps, seed), Decision("miss"))

    def _lookup(self, vector, scope: str, steps: int, seed: int | None) -> Decision:
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

    def remember(
        self, vector, scope: str, seed: int, steps: int, image: np.ndarray, latents: dict, about: dict | None = None
    ):
        """Store a finished generation: its image (L1) and its checkpoint latents (L2), described by
        `about` (its prompt and parameters, what a search shows); nothing when the store fails."""
        self._soft("storing", lambda: self._remember(vector, scope, seed, steps, image, latents, about), None)

    def _remember(self, vector, scope: str, seed: int, steps: int, image: np.ndarray, latents: dict, about: dict):
        about = dict(about or {})
        prompt = about.pop("prompt", "")
        entry = dict(vector=vector, scope=scope, model=self.fingerprint, prompt=prompt, params=about)
        self.store.put_many(
            [dict(entry, kind=IMAGE, payload=to_bytes(image), seed=seed, step=steps, benefit=steps)]
            + [
                dict(entry, kind=LATENT, payload=to_bytes(x), seed=NO_SEED, step=k, benefit=k)
                for k, x in latents.items()
            ]
        )
