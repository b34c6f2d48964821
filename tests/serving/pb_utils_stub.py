"""A small in-process stand-in for `triton_python_backend_utils`, for unit tests of the Python models
(voltacache.serving.python_models) without a tritonserver.

It covers what those models use, with the real module's names and call shapes (Python backend of
Triton 2.51): Tensor, InferenceRequest (a BLS request whose exec() runs a model registered here, in
this process; its response sender and cancellation flag), InferenceResponse, TritonError,
get_input_tensor_by_name, get_output_tensor_by_name,
Logger and MetricFamily / Metric. Tensors are copied at every hand-over, as Triton copies them between
processes, so a model cannot alias another's buffers.

A test installs it as sys.modules["triton_python_backend_utils"] (the `pb_utils` fixture in
test_python_models.py), registers the models a BLS call may reach with `register`, and reads what
was logged (`LOGS`) and counted (`metric_value`). `reset()` forgets all of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

MODELS: dict[str, Callable] = {}  # model name -> what a BLS request to it runs
CALLS: dict[str, int] = {}  # model name -> BLS requests it answered (errors included)
LOGS: list[tuple[str, str]] = []  # (level, message)
FAMILIES: dict[str, MetricFamily] = {}
_LOCK = threading.Lock()


def reset() -> None:
    MODELS.clear()
    CALLS.clear()
    LOGS.clear()
    FAMILIES.clear()


def register(name: str, handler) -> None:
    """Route BLS requests for `name` to `handler`: a Python model (anything with `execute(requests)`,
    after its `initialize`), or a function {input name: array} -> {output name: array} (an engine
    runner's `infer`)."""
    MODELS[name] = handler


class TritonError(Exception):
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS = range(7)

    def __init__(self, message: str, code: int = INTERNAL):
        super().__init__(message)
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class TritonModelException(Exception):
    pass


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        if not isinstance(name, str):
            raise TypeError(f"Tensor name must be str, got {type(name).__name__}")
        if not isinstance(array, np.ndarray):
            raise TypeError(f"Tensor {name}: expected a numpy array, got {type(array).__name__}")
        self._name = name
        self._array = np.array(array, copy=True)  # Triton copies it out of the model's memory

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> tuple[int, ...]:
        return self._array.shape


class InferenceResponse:
    def __init__(self, output_tensors=None, error: TritonError | None = None):
        self._outputs = list(output_tensors or [])
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class InferenceRequest:
    """A request as a model's execute() receives it, and a BLS request a model builds and exec()s."""

    def __init__(self, model_name: str = "", requested_output_names=(), inputs=(), request_id: str = "", **kwargs):
        self.model_name = model_name
        self._requested = list(requested_output_names)
        self._inputs = list(inputs)
        self._request_id = request_id
        self._kwargs = kwargs  # correlation_id, flags, timeout, parameters, ...: accepted, unused here
        self.sender = ResponseSender()
        self.cancelled = False  # a test sets it: the client went away

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.cancelled

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._requested

    def request_id(self) -> str:
        return self._request_id

    def exec(self, decoupled: bool = False) -> InferenceResponse:
        if decoupled:
            raise TritonModelException("the stub serves no decoupled models")
        with _LOCK:
            CALLS[self.model_name] = CALLS.get(self.model_name, 0) + 1
        handler = MODELS.get(self.model_name)
        if handler is None:
            return InferenceResponse(
                error=TritonError(f"Failed for execute the inference request. Model '{self.model_name}' is not ready.")
            )
        if hasattr(handler, "execute"):
            (response,) = handler.execute([self])
            if response.has_error():
                return response
            outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
        else:
            try:
                outputs = handler({t.name(): t.as_numpy() for t in self._inputs})
            except Exception as e:
                return InferenceResponse(error=TritonError(f"{self.model_name}: {e}"))
        missing = [n for n in self._requested if n not in outputs]
        if missing:
            return InferenceResponse(
                error=TritonError(
                    f"{self.model_name}: unexpected inference output(s) {missing}", TritonError.INVALID_ARG
                )
            )
        names = self._requested or list(outputs)
        return InferenceResponse(output_tensors=[Tensor(n, np.asarray(outputs[n])) for n in names])


TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class ResponseSender:
    """What a model that answers later (from its own thread) sends: `responses`, and `finished` once
    a response came with the FINAL flag; a second FINAL is an error, as in Triton."""

    def __init__(self):
        self.responses: list[InferenceResponse] = []
        self.finished = threading.Event()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self.finished.is_set():
            raise TritonModelException("the response sender already sent its final response")
        if response is not None:
            self.responses.append(response)
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.finished.set()


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


class Logger:
    @staticmethod
    def log(message: str, level: str = "INFO") -> None:
        LOGS.append((level, str(message)))

    @staticmethod
    def log_info(message: str) -> None:
        Logger.log(message, "INFO")

    @staticmethod
    def log_warn(message: str) -> None:
        Logger.log(message, "WARNING")

    @staticmethod
    def log_error(message: str) -> None:
        Logger.log(message, "ERROR")

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger.log(message, "VERBOSE")


class Metric:
    def __init__(self, family: MetricFamily, labels: dict):
        self.family, self.labels, self._value = family, dict(labels), 0.0

    def increment(self, value) -> None:
        if self.family.kind == MetricFamily.COUNTER and value < 0:
            raise TritonModelException(f"{self.family.name}: a counter cannot be decremented ({value})")
        with _LOCK:
            self._value += float(value)

    def set(self, value) -> None:
        if self.family.kind != MetricFamily.GAUGE:
            raise TritonModelException(f"{self.family.name}: only a gauge can be set")
        self._value = float(value)

    def value(self) -> float:
        return self._value


class MetricFamily:
    COUNTER, GAUGE = 0, 1

    def __new__(cls, name: str, description: str, kind: int):
        # One family per name here, so that metric_value adds up what every model instance counted,
        # as a scrape of the metrics port adds up their samples.
        existing = FAMILIES.get(name)
        if existing is not None:
            if existing.kind != kind:
                raise TritonModelException(f"metric family {name} exists with another kind")
            return existing
        family = super().__new__(cls)
        family.name, family.description, family.kind, family.metrics = name, description, kind, {}
        FAMILIES[name] = family
        return family

    def __init__(self, name: str, description: str, kind: int):
        pass  # set once, in __new__

    def Metric(self, labels: dict | None = None) -> Metric:  # noqa: N802 (the real module's name)
        key = tuple(sorted((labels or {}).items()))
        if key not in self.metrics:
            self.metrics[key] = Metric(self, labels or {})
        return self.metrics[key]


def metric_value(name: str, **labels) -> float:
    """The sum of a family's metrics whose labels include the given ones (0 for an unknown family),
    as a scrape of Triton's metrics port would add them up."""
    family = FAMILIES.get(name)
    if family is None:
        return 0.0
    wanted = {k: str(v) for k, v in labels.items()}
    return sum(m.value() for m in family.metrics.values() if all(str(m.labels.get(k)) == v for k, v in wanted.items()))
