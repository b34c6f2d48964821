"""Call the txt2img / img2img ensembles with tritonclient, over gRPC or HTTP."""

from __future__ import annotations

import time

from ..cache.search import Found, SearchQuery
from ..cache.search import from_triton as search_results
from ..errors import ServerFailed, UsageError, VoltacacheError
from ..request import Images, Request
from . import protocol as p

TRITON_CLIENT_DTYPES = {"float32": "FP32", "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "object": "BYTES"}


class Client:
    """A voltacache deployment seen from any program: `Client(url).generate("a cat", steps=20)`."""

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 600):
        if protocol == "grpc":
            import tritonclient.grpc as triton
        elif protocol == "http":
            import tritonclient.http as triton
        else:
            raise UsageError(f"--protocol {protocol!r}: use grpc or http")
        self.url, self.triton, self.protocol, self.timeout_s = url, triton, protocol, timeout_s
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        try:
            self.client = triton.InferenceServerClient(url, **kwargs)
        except Exception as e:  # tritonclient raises plain exceptions for a malformed URL
            raise UsageError(f"--url {url!r}: not a HOST:PORT address ({e})") from None
        self.shape = None  # (batch, height, width) the deployment serves: image_shape()

    def infer(self, model: str, values: dict, outputs: list[str]) -> dict:
        """Send `values` (name -> numpy array) to `model`; the named outputs as numpy arrays."""
        from tritonclient.utils import InferenceServerException

        inputs = self.inputs(values)
        requested = [self.triton.InferRequestedOutput(n) for n in outputs]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self.client.infer(model, inputs, outputs=requested, **kwargs)
        except InferenceServerException as e:
            raise self.failure(model, e.message() or str(e)) from None
        except OSError as e:  # HTTP: refused, reset, unreachable
            raise self.failure(model, str(e)) from None
        return {n: result.as_numpy(n) for n in outputs}

    def inputs(self, values: dict) -> list:
        """tritonclient's InferInput for each (name -> numpy array)."""
        inputs = []
        for name, value in values.items():
            dtype = "BYTES" if value.dtype == object else TRITON_CLIENT_DTYPES[str(value.dtype)]
            tensor = self.triton.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return inputs

    def failure(self, model: str, message: str) -> VoltacacheError:
        """A server that cannot be reached, or the server's own answer to a bad request."""
        unreachable = ("failed to connect", "connection refused", "unavailable", "errno 111", "name resolution")
        if any(word in message.lower() for word in unreachable):
            return ServerFailed(
                f"--url {self.url}: no voltacache server answers over {self.protocol} ({message.splitlines()[0]}); "
                "start one with `voltacache serve`"
            )
        return VoltacacheError(f"{model}: {message}")

    def generate(self, request: Request | str, /, **fields) -> Images:
        """`generate("a cat", steps=20, seed=1)` or `generate(Request(...))`, checked here and again in
        the server. `init_image` may be a path, a PIL image or uint8 pixels of any size."""
        request = Request.of(request, **fields).check()
        if request.height is not None or request.width is not None:
            _, height, width = self.image_shape()
            request.check_size(height, width)
        started = time.perf_counter()
        out = self.infer(request.model, request.to_triton(), [t.name for t in p.STATS] + [p.IMAGES])
        return Images(
            images=out[p.IMAGES],
            seed=int(out[p.SEED_USED][0]),
            unet_deep_calls=int(out[p.UNET_DEEP_CALLS][0]),
            unet_shallow_calls=int(out[p.UNET_SHALLOW_CALLS][0]),
            steps_computed=int(out[p.STEPS_COMPUTED][0]),
            seconds=time.perf_counter() - started,
            cache=out[p.CACHE_LAYER][0].decode(),
            similarity=float(out[p.SIMILARITY][0]),
        )

    def search(self, query: SearchQuery | str, /, **fields) -> list[Found]:
        """The stored entries nearest a prompt, best first: `search("a red circle", top=9, thumbnail=128)`,
        or `search(SearchQuery(...))` for any mode (voltacache.cache.search)."""
        query = query.replace(**fields) if isinstance(query, SearchQuery) else SearchQuery("images", query, **fields)
        out = self.infer(p.CACHE_SEARCH, query.check().to_triton(), [t.name for t in p.SEARCH_OUTPUTS])
        return search_results(out[p.RESULTS], out[p.RESULT_IMAGES])

    def recommend(self, partial: str, top: int = 5) -> list[Found]:
        """The distinct stored prompts nearest a partial prompt (no images), best first."""
        return self.search(SearchQuery("prompts", partial, top))

    def cache_list(self, order: str = "newest", top: int = 20, thumbnail: int = 0) -> list[Found]:
        """What the cache holds for this deployment's model: `order` newest or most-used."""
        return self.search(SearchQuery(order, "", top, thumbnail))

    def image_shape(self) -> tuple[int, int, int]:
        """(batch, height, width) of the deployment's images (its engines are static), asked once."""
        if self.shape is None:
            as_json = {"as_json": True} if self.protocol == "grpc" else {}
            try:
                metadata = self.client.get_model_metadata(p.TXT2IMG, **as_json)
            except Exception as e:
                raise self.failure(p.TXT2IMG, str(e)) from None
            shape = next(o["shape"] for o in metadata["outputs"] if o["name"] == p.IMAGES)  # batch, h, w, 3
            self.shape = int(shape[0]), int(shape[1]), int(shape[2])
        return self.shape
