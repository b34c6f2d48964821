"""Call the txt2img / img2img ensembles with tritonclient, over gRPC or HTTP."""

from __future__ import annotations

import re
import threading
import time
import uuid

import numpy as np

from ..cache.search import RESULT_IMAGES, RESULTS, SEARCH_OUTPUTS, Found, SearchQuery
from ..cache.search import from_triton as search_results
from ..errors import InvalidRequest, ServerFailed, UsageError, VoltacacheError
from ..request import Request
from ..result import IMAGES, STAT_TENSORS, Result
from . import protocol as p

TRITON_CLIENT_DTYPES = {"float32": "FP32", "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "object": "BYTES"}


def check_url(url: str) -> None:
    """HOST:PORT, as tritonclient takes it: a scheme or a path is the commonest slip."""
    if not isinstance(url, str) or "://" in url or "/" in url or url.count(":") < 1:
        bare = str(url).split("://", 1)[-1].split("/", 1)[0]
        example = bare if ":" in bare else f"{bare or '127.0.0.1'}:8001"  # a bare host: gRPC's default port
        raise UsageError(f"--url {url!r}: give HOST:PORT without a scheme or path, e.g. {example}")
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--url {url!r}: give HOST:PORT, the port a number from 1 to 65535, e.g. 127.0.0.1:8001")


class Client:
    """A voltacache deployment seen from any program: `Client(url).generate("a cat", steps=20)`."""

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 600):
        check_url(url)
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
        self.in_flight: set[str] = set()  # ids of the requests this client is waiting for
        self.lock = threading.Lock()

    def infer(self, model: str, values: dict, outputs: list[str]) -> dict:
        """Send `values` (name -> numpy array) to `model`; the named outputs as numpy arrays.

        Each call carries a fresh request id, which `cancel` names to free the server's work, and the
        client's timeout as its deadline: the server stops working on it when this client stops waiting."""
        from tritonclient.utils import InferenceServerException

        inputs = self.inputs(values)
        requested = [self.triton.InferRequestedOutput(n) for n in outputs]
        request_id = uuid.uuid4().hex  # unguessable: whoever knows it can cancel the request
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        with self.lock:
            self.in_flight.add(request_id)
        try:
            result = self.client.infer(
                model, inputs, outputs=requested, request_id=request_id, timeout=int(self.timeout_s * 1e6), **kwargs
            )
        except InferenceServerException as e:
            raise self.failure(model, e.message() or str(e), e.status()) from None
        except Exception as e:  # HTTP: refused, reset, unreachable, or not HTTP at all
            raise self.failure(model, str(e)) from None
        finally:
            with self.lock:
                self.in_flight.discard(request_id)
        return {n: result.as_numpy(n) for n in outputs}

    def cancel(self, request_id: str | None = None, timeout_s: float = 5) -> int:
        """Tell the server to stop the request of this id (default: every request this client is waiting
        for), so that a client that goes away frees its slot; returns how many the server had in flight.
        Best effort: a server that does not answer is not waited for longer than `timeout_s`."""
        with self.lock:
            ids = [request_id] if request_id else list(self.in_flight)
        found = 0
        for rid in ids:
            other = Client(self.url, self.protocol, timeout_s)  # this one's channel may be busy or closing
            try:
                out = other.infer(p.DENOISER, {p.CANCEL: np.array([rid.encode()], dtype=object)}, [p.CANCELLED])
                found += int(out[p.CANCELLED][0])
            except VoltacacheError:
                pass
        return found

    def inputs(self, values: dict) -> list:
        """tritonclient's InferInput for each (name -> numpy array)."""
        inputs = []
        for name, value in values.items():
            dtype = "BYTES" if value.dtype == object else TRITON_CLIENT_DTYPES[str(value.dtype)]
            tensor = self.triton.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        return inputs

    def failure(self, model: str, message: str, status: str | None = None) -> VoltacacheError:
        """A server that cannot be reached, or the server's own answer to a bad request (INVALID_ARG
        for a request that is wrong: a UsageError, as in process)."""
        unreachable = ("failed to connect", "connection refused", "unavailable", "errno 111", "name resolution")
        if status is None or any(word in message.lower() for word in unreachable):  # no Triton answered
            other = self.other_port()  # a server answers, on another port: the --url is the mistake
            if other:
                return UsageError(f"--url {self.url}: {other}")
            return ServerFailed(f"--url {self.url}: {self.not_answering(message)}")
        # the model that failed names itself: Triton's "in ensemble 'txt2img', denoiser: ..." says it twice
        message = re.sub(r"^in ensemble '[^']*', ", "", message)
        if not re.match(r"^[a-z_0-9]+: ", message):
            message = f"{model}: {message}"
        if status in ("StatusCode.INVALID_ARGUMENT", "400"):
            return InvalidRequest(message)
        return VoltacacheError(message)

    def not_answering(self, message: str) -> str:
        return (
            f"no voltacache server answers over {self.protocol} ({message.splitlines()[0]}); start one with "
            "`voltacache serve`"
        )

    def other_port(self) -> str | None:
        """What answers at the URL when it is not this protocol's port of a Triton server: its metrics
        port, or (gRPC) its HTTP port. None otherwise. Asked only after a call failed."""
        import urllib.error
        import urllib.request

        if getattr(self, "_other", False) is not False:
            return self._other
        self._other = None
        for path, what in (("/metrics", "metrics"), ("/v2/health/live", "HTTP")):
            if what == "HTTP" and self.protocol == "http":
                continue
            try:
                with urllib.request.urlopen(f"http://{self.url}{path}", timeout=2) as response:
                    text = response.read(4096).decode(errors="replace")
            except (urllib.error.URLError, OSError, ValueError):
                continue
            if what == "HTTP" or "nv_" in text or "# HELP" in text:
                fix = "its gRPC port (default 8001)" if self.protocol == "grpc" else "its HTTP port (default 8000)"
                hint = " or add --protocol http" if what == "HTTP" else ""
                self._other = f"this is a Triton server's {what} port; give {fix}{hint}"
                return self._other
        if self.protocol == "http" and self._grpc_answers():
            self._other = (
                "this is a Triton server's gRPC port; give its HTTP port (default 8000) or drop --protocol http"
            )
        return self._other

    def _grpc_answers(self) -> bool:
        import tritonclient.grpc as grpc

        try:
            client = grpc.InferenceServerClient(self.url)
            try:
                return bool(client.is_server_live(client_timeout=2))
            finally:
                client.close()
        except Exception:  # nothing, or something else, answers
            return False

    def generate(self, request: Request | str, /, **fields) -> Result:
        """`generate("a cat", steps=20, seed=1)` or `generate(Request(...))`, checked here and again in
        the server. `init_image` may be a path, a PIL image or uint8 pixels of any size."""
        request = Request.of(request, **fields).check()
        if request.height is not None or request.width is not None:
            _, height, width = self.image_shape()
            if height > 0 and width > 0:  # engines of one size; of several (-1), the server judges
                request.check_size(((height, width),))
        started = time.perf_counter()
        out = self.infer(p.ensemble(request), request.to_triton(), [t.name for t in STAT_TENSORS] + [IMAGES])
        return Result.from_triton(out.get, time.perf_counter() - started)

    def search(self, query: SearchQuery | str, /, **fields) -> list[Found]:
        """The stored entries nearest a prompt, best first: `search("a red circle", top=9, thumbnail=128)`,
        or `search(SearchQuery(...))` for any mode (voltacache.cache.search)."""
        query = query.replace(**fields) if isinstance(query, SearchQuery) else SearchQuery("images", query, **fields)
        out = self.infer(p.CACHE_SEARCH, query.check().to_triton(), [t.name for t in SEARCH_OUTPUTS])
        return search_results(out[RESULTS], out[RESULT_IMAGES])

    def recommend(self, partial: str, top: int = 5) -> list[Found]:
        """The distinct stored prompts nearest a partial prompt (no images), best first."""
        return self.search(SearchQuery("prompts", partial, top))

    def cache_list(self, order: str = "newest", top: int = 20, thumbnail: int = 0) -> list[Found]:
        """What the cache holds for this deployment's model: `order` newest or most-used."""
        return self.search(SearchQuery(order, "", top, thumbnail))

    def image_shape(self) -> tuple[int, int, int]:
        """(batch, height, width) of the deployment's images (-1 sides: engines of several sizes), asked once."""
        if self.shape is None:
            as_json = {"as_json": True} if self.protocol == "grpc" else {}
            try:
                metadata = self.client.get_model_metadata(p.TXT2IMG, **as_json)
            except Exception as e:
                raise self.failure(p.TXT2IMG, str(e)) from None
            shape = next(o["shape"] for o in metadata["outputs"] if o["name"] == IMAGES)  # batch, h, w, 3
            self.shape = int(shape[0]), int(shape[1]), int(shape[2])
        return self.shape
