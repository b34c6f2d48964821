"""Call the txt2img / img2img ensembles with tritonclient, over gRPC or HTTP."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import VoltacacheError
from ..pipeline import random_seed
from . import protocol as p

TRITON_CLIENT_DTYPES = {"float32": "FP32", "int32": "INT32", "int64": "INT64", "uint8": "UINT8", "object": "BYTES"}


@dataclass
class ServedImage:
    images: np.ndarray  # uint8 (batch, height, width, 3)
    seed: int
    unet_deep_calls: int
    unet_shallow_calls: int
    steps_computed: int
    seconds: float
    cache: str = "off"
    similarity: float = 0.0


class Client:
    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 600):
        if protocol == "grpc":
            import tritonclient.grpc as triton
        elif protocol == "http":
            import tritonclient.http as triton
        else:
            raise VoltacacheError(f"--protocol {protocol!r}: use grpc or http")
        self.triton, self.protocol, self.timeout_s = triton, protocol, timeout_s
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        self.client = triton.InferenceServerClient(url, **kwargs)

    def infer(self, model: str, values: dict, outputs: list[str]) -> dict:
        """Send `values` (name -> numpy array) to `model`; the named outputs as numpy arrays."""
        inputs = []
        for name, value in values.items():
            dtype = "BYTES" if value.dtype == object else TRITON_CLIENT_DTYPES[str(value.dtype)]
            tensor = self.triton.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        requested = [self.triton.InferRequestedOutput(n) for n in outputs]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            result = self.client.infer(model, inputs, outputs=requested, **kwargs)
        except self.triton_error() as e:
            raise VoltacacheError(f"{model}: {e.message() if hasattr(e, 'message') else e}") from e
        return {n: result.as_numpy(n) for n in outputs}

    def triton_error(self):
        from tritonclient.utils import InferenceServerException

        return InferenceServerException

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: int = 50,
        guidance: float = 7.5,
        seed: int | None = None,
        scheduler: str = "pndm",
        cache_interval: int = 1,
        init_image: np.ndarray | None = None,
        strength: float = 0.8,
        cache: str = "on",
    ) -> ServedImage:
        seed = random_seed() if seed is None else seed  # explicit, so the response cache never repeats a "random" image
        values = {
            p.PROMPT: np.array([prompt.encode()], dtype=object),
            p.NEGATIVE_PROMPT: np.array([negative_prompt.encode()], dtype=object),
            p.STEPS: np.array([steps], np.int32),
            p.GUIDANCE: np.array([guidance], np.float32),
            p.SEED: np.array([seed], np.int64),
            p.SCHEDULER: np.array([scheduler.encode()], dtype=object),
            p.CACHE_INTERVAL: np.array([cache_interval], np.int32),
            p.CACHE: np.array([cache.encode()], dtype=object),
        }
        model = p.TXT2IMG
        if init_image is not None:
            model = p.IMG2IMG
            values[p.INIT_IMAGE] = np.ascontiguousarray(init_image, dtype=np.uint8)
            values[p.STRENGTH] = np.array([strength], np.float32)
        started = time.perf_counter()
        out = self.infer(model, values, [t.name for t in p.STATS] + [p.IMAGES])
        return ServedImage(
            images=out[p.IMAGES],
            seed=int(out[p.SEED_USED][0]),
            unet_deep_calls=int(out[p.UNET_DEEP_CALLS][0]),
            unet_shallow_calls=int(out[p.UNET_SHALLOW_CALLS][0]),
            steps_computed=int(out[p.STEPS_COMPUTED][0]),
            seconds=time.perf_counter() - started,
            cache=out[p.CACHE_LAYER][0].decode(),
            similarity=float(out[p.SIMILARITY][0]),
        )
