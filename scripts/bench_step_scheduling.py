"""Step-level batching in Triton two ways, on one synthetic step: which keeps the batch fuller?

    .venv/bin/python scripts/bench_step_scheduling.py --steps 20 --requests 64 --concurrency 1 4 8 16

- iterative: Triton's sequence batcher with `iterative_sequence: true`. Each `execute` is one tick over
  the requests Triton hands it; a request not yet at its last step is released with
  TRITONSERVER_REQUEST_RELEASE_RESCHEDULE (and a None response) and comes back in a later execute.
  Triton gives each request its own correlation id (it starts a sequence per request), which keys
  the request's state across executes.
- threaded: voltacache's way (voltacache.pipeline.batching.StepBatcher). `execute` hands each request to a
  thread and returns None; the thread ticks over every request in flight and answers each through
  its response sender with TRITONSERVER_RESPONSE_COMPLETE_FINAL.

A tick over k requests costs `--fixed-ms + k * --per-request-ms` of matmuls (an emulated batched
U-Net call). Each response carries the batch size of every tick the request took part in, from
which come the occupancy (requests per tick) and, for `iterative`, how many requests Triton handed
each execute. The two models alternate at each concurrency level, so both see the same machine.

What `iterative` needs on tritonserver 2.51 (found by running it): max_batch_size > 0 (at 0 every
execute gets one request), so batch-first inputs and requests of batch size 1 ("must specify
batch-size 1 due to requirements of sequence batcher"), also inside an ensemble; no response cache
("Response Cache does not currently support model ... with sequence batching scheduler"); and a
max_sequence_idle_microseconds longer than any tick (see model_config).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from voltacache.benchmark import free_port, machine, write_json
from voltacache.serving.protocol import REPOSITORY_MARKER
from voltacache.serving.server import TritonServer

MODELS = ("iterative", "threaded")

# Both models' model.py; the last line written after it picks the class.
MODEL_SOURCE = '''
import json
import queue
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class Step:
    """One batched step over k requests: matmuls for fixed_ms + k * per_request_ms of wall time."""

    def __init__(self, config):
        parameters = {name: float(v["string_value"]) for name, v in config["parameters"].items()}
        self.fixed_s = parameters["fixed_ms"] / 1000
        self.per_request_s = parameters["per_request_ms"] / 1000
        self.a = np.random.default_rng(0).standard_normal((64, 64), dtype=np.float32)

    def __call__(self, k):
        deadline = time.perf_counter() + self.fixed_s + k * self.per_request_s
        while time.perf_counter() < deadline:
            self.a @ self.a


def scalar(request, name):
    return int(pb_utils.get_input_tensor_by_name(request, name).as_numpy().item())


def response(history):
    """TICKS: ticks the request took; BATCHES: the batch size of each of them."""
    return pb_utils.InferenceResponse(
        [
            pb_utils.Tensor("TICKS", np.array([[len(history)]], np.int32)),
            pb_utils.Tensor("BATCHES", np.array([history], np.int32)),
        ]
    )


class Iterative:
    """Triton schedules: one execute is one tick; unfinished requests are rescheduled."""

    def initialize(self, args):
        self.step = Step(json.loads(args["model_config"]))
        self.state = {}  # correlation id (Triton assigns one per request) -> (ID input, batch sizes)

    def execute(self, requests):
        # The direct strategy pads a freed slot below a busy one with a null request: correlation
        # id 0, no flags, uninitialized inputs. It gets a throwaway response and no step.
        batch = sum(request.correlation_id() != 0 for request in requests)
        self.step(batch)
        responses = []
        for request in requests:
            key, ident = request.correlation_id(), scalar(request, "ID")
            if key == 0:
                responses.append(response([]))
                continue
            if request.flags() & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START:
                if key in self.state:
                    self.state.pop(key)
                    responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{key} reused")))
                    continue
                self.state[key] = (ident, [])
            owner, history = self.state[key]
            if owner != ident:  # the key must follow the request, not a slot
                self.state.pop(key)
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{key}: {owner}!={ident}")))
                continue
            history.append(batch)
            if len(history) < scalar(request, "STEPS"):
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                responses.append(None)  # the one response comes with the last step
            else:
                responses.append(response(self.state.pop(key)[1]))
        return responses


class Threaded:
    """The model schedules: execute hands requests to a thread that ticks over all in flight."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.step = Step(config)
        self.capacity = config["max_batch_size"]
        self.waiting = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def execute(self, requests):
        for request in requests:
            self.waiting.put((request, request.get_response_sender(), scalar(request, "STEPS"), []))
        return None

    def serve(self):
        active = []  # (request, sender, steps, batch sizes)
        while True:
            while len(active) < self.capacity:  # admit at the step boundary; sleep when idle
                try:
                    work = self.waiting.get(block=not active)
                except queue.Empty:
                    break
                if work is None:
                    return
                active.append(work)
            self.step(len(active))
            for _, _, _, history in active:
                history.append(len(active))
            for _, sender, steps, history in active:
                if len(history) >= steps:
                    sender.send(response(history), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            active = [work for work in active if len(work[3]) < work[2]]

    def finalize(self):
        self.waiting.put(None)
        self.thread.join()
'''


def model_config(name: str, args) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=args.max_batch)
    config.input.extend(mc.ModelInput(name=n, data_type=mc.TYPE_INT32, dims=[1]) for n in ("STEPS", "ID"))
    config.output.append(mc.ModelOutput(name="TICKS", data_type=mc.TYPE_INT32, dims=[1]))
    config.output.append(mc.ModelOutput(name="BATCHES", data_type=mc.TYPE_INT32, dims=[-1]))
    config.instance_group.append(mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1))
    config.parameters["fixed_ms"].string_value = str(args.fixed_ms)
    config.parameters["per_request_ms"].string_value = str(args.per_request_ms)
    if name == "iterative":
        batching = config.sequence_batching
        batching.iterative_sequence = True
        # The idle clock runs while a request executes: a tick longer than this (default 1 s) ends
        # every sequence in it, the reschedule fails and the client is never answered.
        batching.max_sequence_idle_microseconds = int(args.idle_s * 1e6)
        if args.strategy == "oldest":
            batching.oldest.max_candidate_sequences = args.max_batch
            batching.oldest.max_queue_delay_microseconds = args.queue_delay_us
        else:
            batching.direct.max_queue_delay_microseconds = args.queue_delay_us
    else:
        config.response_cache.enable = True  # as voltacache's denoiser (unique IDs: never a hit)
    return config


def write_repository(root: Path, args) -> Path:
    for name in MODELS:
        folder = root / name / "1"
        folder.mkdir(parents=True)
        (folder / "model.py").write_text(MODEL_SOURCE + f"\nTritonPythonModel = {name.capitalize()}\n")
        text = text_format.MessageToString(model_config(name, args))
        text_format.Parse(text, mc.ModelConfig())  # round trip: a config Triton would reject fails here
        (root / name / "config.pbtxt").write_text(text)
    (root / REPOSITORY_MARKER).write_text(json.dumps({"engines": "none", "component_backend": "python"}))
    return root


def drive(url: str, model: str, steps: int, requests: int, concurrency: int, ids) -> dict:
    """`requests` requests from `concurrency` threads, each with its own client, back to back."""
    latencies, histories, errors, lock = [], [], [], threading.Lock()
    left = iter(range(requests))

    def worker():
        client = grpcclient.InferenceServerClient(url)
        while True:
            with lock:
                if next(left, None) is None:
                    break
                ident = next(ids)
            inputs = [grpcclient.InferInput(n, [1, 1], "INT32") for n in ("STEPS", "ID")]
            inputs[0].set_data_from_numpy(np.array([[steps]], np.int32))
            inputs[1].set_data_from_numpy(np.array([[ident]], np.int32))
            started = time.perf_counter()
            try:
                result = client.infer(model, inputs, client_timeout=120)
            except Exception as e:
                with lock:
                    errors.append(str(e))
                continue
            latency = time.perf_counter() - started
            with lock:
                latencies.append(latency)
                histories.append(result.as_numpy("BATCHES")[0].tolist())
        client.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return summarize(latencies, histories, errors, wall)


def summarize(latencies, histories, errors, wall) -> dict:
    # A tick of k requests appears in k histories: ticks = sum of 1/k over all entries.
    entries = [k for history in histories for k in history]
    ticks = Counter()
    for k in entries:
        ticks[k] += 1 / k
    lat = sorted(latencies)
    return {
        "completed": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "requests_per_s": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat) if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] if lat else None,
        "ticks": round(sum(ticks.values())),
        "mean_batch_per_tick": len(entries) / sum(ticks.values()) if entries else None,
        "ticks_by_batch_size": {k: round(n) for k, n in sorted(ticks.items())},
    }


HEADER = f"{'model':>9} {'conc':>4} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'batch/tick':>10}  ticks by batch size"


def print_row(name: str, concurrency: int, run: dict) -> None:
    sizes = " ".join(f"{k}:{n}" for k, n in run["ticks_by_batch_size"].items())
    failed = f"  {run['errors']} errors: {run['first_error']}" if run["errors"] else ""
    p50, p99, occ = run["p50_ms"] or float("nan"), run["p99_ms"] or float("nan"), run["mean_batch_per_tick"] or 0
    print(f"{name:>9} {concurrency:>4} {run['requests_per_s']:7.2f} {p50:8.1f} {p99:8.1f} {occ:10.2f}  {sizes}{failed}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per request")
    parser.add_argument("--requests", type=int, default=64, help="requests per model per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--fixed-ms", type=float, default=5.0, help="cost of a tick, whatever its batch")
    parser.add_argument("--per-request-ms", type=float, default=1.0, help="added cost per request in a tick")
    parser.add_argument("--max-batch", type=int, default=16, help="max_batch_size of both models")
    parser.add_argument("--strategy", choices=("oldest", "direct"), default="oldest", help="iterative's batcher")
    parser.add_argument("--queue-delay-us", type=int, default=0, help="iterative's max_queue_delay_microseconds")
    parser.add_argument("--idle-s", type=float, default=60.0, help="iterative's max_sequence_idle_microseconds")
    parser.add_argument("--out", type=Path, default=Path("build/results/step_scheduling.json"))
    args = parser.parse_args()
    print(HEADER)

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # the step's matmuls on one core, as the models' stubs inherit it
    ids = iter(range(1, 1 << 30))
    results = {name: {} for name in MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(Path(tmp) / "repo", args)
        with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
            for name in MODELS:  # warm up: first calls pay for connections and imports
                drive(server.grpc_url, name, 2, 2, 2, ids)
            for concurrency in args.concurrency:
                for name in MODELS:
                    run = drive(server.grpc_url, name, args.steps, args.requests, concurrency, ids)
                    results[name][concurrency] = run
                    print_row(name, concurrency, run)
            log_errors = [text for _, text in server.log_messages("E") if "CudaDriverHelper" not in text]
    write_json(
        args.out,
        {
            "question": "step-level batching: Triton iterative sequences vs a model-owned scheduler thread",
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine(),
            "results": results,
            "server_errors": log_errors[:20],
        },
    )
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
