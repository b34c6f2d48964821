"""Where one U-Net call's time goes, per kind of operation, in each engine folder given: why a U-Net runs
below its precision's GEMM floor (issue 31). ONNX Runtime's own profiler (per node, grouped by op type) and
OpenVINO's performance counters (per node, grouped by the layer type and the kernel that ran it, e.g.
`brgconv_avx512_amx_I8`), on one `unet_deep` call of the export's batch after a warm-up.

    python scripts/profile_unet.py --engines ort-int8=build/bench/sd15cpu/ort_int8 \\
        --engines ov-int8=build/bench/sd15cpu/ov_int8 --out build/results/profile_unet.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from voltacache.benchmark import machine, write_json
from voltacache.runtime.manifests import read_engine_manifest
from voltacache.specs import UNET_DEEP

TOP = 12


def feeds_for(spec) -> dict:
    rng = np.random.default_rng(0)
    return {
        t.name: (rng.integers(0, 1000, t.shape) if "int" in str(t.dtype) else rng.standard_normal(t.shape)).astype(
            t.dtype
        )
        for t in spec.inputs
    }


def profile_onnxruntime(path: Path, manifest, spec) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in (manifest.session_options or {}).items():
        if key.startswith("session."):
            options.add_session_config_entry(key, str(value))
        else:
            setattr(options, key, getattr(ort.GraphOptimizationLevel, value) if key.endswith("_level") else value)
    feeds = feeds_for(spec)
    with tempfile.TemporaryDirectory() as scratch:
        options.enable_profiling, options.profile_file_prefix = True, str(Path(scratch) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)  # warm-up (its events are dropped below: only the last run counts)
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last = runs[-1]["ts"]
    spent = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last:
            spent[e["args"]["op_name"]] += e["dur"] / 1e6
    return dict(spent)


def profile_openvino(path: Path, manifest, spec) -> dict[str, float]:
    import openvino as ov

    precision = manifest.inference_precision or "f32"
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
    feeds = feeds_for(spec)
    request.infer(feeds)
    request.infer(feeds)
    spent = defaultdict(float)
    for info in request.profiling_info:
        if info.status == info.Status.EXECUTED:
            spent[f"{info.node_type} [{info.exec_type}]"] += info.real_time.total_seconds()
    return dict(spent)


def profile(folder: Path) -> dict:
    manifest = read_engine_manifest(folder)
    spec = manifest.export.components[UNET_DEEP].spec
    path = folder / manifest.files[UNET_DEEP]
    run = {"onnxruntime": profile_onnxruntime, "openvino": profile_openvino}[manifest.backend]
    started = time.perf_counter()
    spent = run(path, manifest, spec)
    total = sum(spent.values())
    ranked = sorted(spent.items(), key=lambda item: -item[1])
    return {
        "backend": manifest.backend,
        "precision": manifest.export.precision,
        "total_s": total,
        "seconds": dict(ranked),
        "share": {k: v / total for k, v in ranked},
        "profiled_in_s": time.perf_counter() - started,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", action="append", required=True, help="LABEL=FOLDER (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("build/results/profile_unet.json"))
    args = parser.parse_args()
    result = {"machine": machine(), "engines": {}}
    for item in args.engines:
        label, _, folder = item.partition("=")
        entry = result["engines"][label] = profile(Path(folder))
        print(f"{label}: {entry['backend']} {entry['precision']}, {entry['total_s']:.3f} s in kernels")
        for name, share in list(entry["share"].items())[:TOP]:
            print(f"  {share:6.1%}  {entry['seconds'][name]:.3f} s  {name}")
    write_json(args.out, result)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
