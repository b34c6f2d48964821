"""INT8 against fp32 where it is decided: the full U-Net call, and the GEMM rates ONNX Runtime reaches.

1. The `unet_deep` engines of two engine folders (fp32 and int8), loaded in one process, called
   alternately on the same mid-schedule input; median seconds per call and the ratio.
2. A 2048^3 fp32 MatMul against an int8 MatMulInteger (u8 x s8: VNNI on this CPU) in ONNX Runtime:
   the rates that set the physical floor of each precision.

    python scripts/bench_int8.py --fp32 build/bench16/engines_0_256 --int8 build/bench16/engines_0_256_int8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from voltacache.benchmark import machine, write_json


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def unet_calls(fp32: Path, int8: Path, repeats: int) -> dict:
    from voltacache.compile.export import random_inputs
    from voltacache.runtime.engines import load_engines
    from voltacache.specs import TIMESTEP, UNET_DEEP

    runners = {
        name: load_engines(path, components=[UNET_DEEP]).runners[UNET_DEEP]
        for name, path in (("fp32", fp32), ("int8", int8))
    }
    geometry = load_engines(fp32, components=[]).export.geometry
    feeds = random_inputs(runners["fp32"].spec, geometry, np.random.default_rng(0))
    feeds[TIMESTEP] = np.array([500.0], np.float32)
    times = {name: [] for name in runners}
    for runner in runners.values():
        runner.infer(feeds)
    for _ in range(repeats):  # alternating, so that a slow moment hits both
        for name, runner in runners.items():
            started = time.perf_counter()
            runner.infer(feeds)
            times[name].append(time.perf_counter() - started)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    return {"seconds_per_call": medians, "runs": times, "int8_speedup": medians["fp32"] / medians["int8"]}


def gemm_rates(n: int, repeats: int) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def session(op, a_type, weights, out):
        # the weights a constant, as in a model: ONNX Runtime packs them once, at load
        a = helper.make_tensor_value_info("a", a_type, [n, n])
        b = numpy_helper.from_array(weights, "b")
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["y"])], op, [a], [helper.make_tensor_value_info("y", out, [n, n])], [b]
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    int8_weights = rng.integers(-127, 127, (n, n), dtype=np.int8)
    cases = {
        "fp32_matmul": (
            session("MatMul", TensorProto.FLOAT, rng.standard_normal((n, n), np.float32), TensorProto.FLOAT),
            {"a": rng.standard_normal((n, n), np.float32)},
        ),
        "int8_matmulinteger": (
            session("MatMulInteger", TensorProto.UINT8, int8_weights, TensorProto.INT32),
            {"a": rng.integers(0, 255, (n, n), dtype=np.uint8)},
        ),
    }
    rates = {
        name: 2 * n**3 / median_seconds(lambda s=s, f=f: s.run(None, f), repeats) / 1e9
        for name, (s, f) in cases.items()
    }
    return {"giga_ops_per_s": rates, "int8_over_fp32": rates["int8_matmulinteger"] / rates["fp32_matmul"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", type=Path, required=True, help="engines built from an fp32 export")
    parser.add_argument("--int8", type=Path, required=True, help="engines built from an int8 export")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("docs/results/int8_kernels.json"))
    args = parser.parse_args()
    result = {
        "machine": machine(),
        "unet_deep": unet_calls(args.fp32, args.int8, args.repeats),
        "gemm": gemm_rates(2048, 5),
    }
    write_json(args.out, result)
    calls, gemm = result["unet_deep"], result["gemm"]
    per_call = calls["seconds_per_call"]
    speedup = calls["int8_speedup"]
    print(f"unet_deep per call: fp32 {per_call['fp32']:.3f} s, int8 {per_call['int8']:.3f} s ({speedup:.2f}x)")
    print(
        f"GEMM 2048^3: fp32 {gemm['giga_ops_per_s']['fp32_matmul']:.0f} GFLOP/s, int8 "
        f"{gemm['giga_ops_per_s']['int8_matmulinteger']:.0f} G ops/s ({gemm['int8_over_fp32']:.2f}x)"
    )
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
