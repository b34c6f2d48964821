"""Peak memory and time of exporting a full architecture on this machine (issue 18: SDXL within 24 GiB).

Writes the preset's pipeline (random weights) once, then exports it in a child process and reports
that process's peak resident memory (getrusage of the child: the kernel's own high-water mark),
its wall time and each component's size, errors and precision.

    python scripts/measure_export.py --preset sdxl --size 512 --precision fp16 --out build/export_sdxl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from voltacache.benchmark import machine, write_json

EXPORT = """
import sys
from pathlib import Path
from voltacache.compile.export import export_model
from voltacache.compile.options import ExportOptions
size = int(sys.argv[3])
options = ExportOptions(precision=sys.argv[4], height=size, width=size)
export_model(Path(sys.argv[1]), Path(sys.argv[2]), options, force=True)
"""


def child(code: str, *args) -> tuple[float, float]:
    """Run `code` in a fresh Python; (seconds, its peak RSS in GiB). Raises on failure."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
    return seconds, peak_kib / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sdxl")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--out", type=Path, default=Path("build/export_sdxl"))
    parser.add_argument("--onnx", type=Path, help="the export folder (default OUT/onnx_PRECISION_SIZE)")
    parser.add_argument("--json", type=Path, default=Path("build/results/export_sdxl.json"))
    args = parser.parse_args()

    model = args.out / "model"
    if not model.is_dir():
        code = "import sys; from pathlib import Path; from voltacache.compile.presets import write_pipeline; "
        code += "write_pipeline(Path(sys.argv[1]), sys.argv[2])"
        seconds, _ = child(code, model, args.preset)
        print(f"wrote {args.preset} with random weights in {seconds:.0f} s")
    onnx = args.onnx or args.out / f"onnx_{args.precision}_{args.size}"
    seconds, peak = child(EXPORT, model, onnx, args.size, args.precision)
    manifest = json.loads((onnx / "manifest.json").read_text())
    components = {
        name: {
            "precision": entry.get("precision"),
            "max_error": entry["max_error"],
            "unsplit_error": entry.get("unsplit_error"),
            "attention_nodes": entry["attention_nodes"],
            "gib_on_disk": round(sum(f.stat().st_size for f in onnx.glob(f"{name}.onnx*")) / 2**30, 2),
        }
        for name, entry in manifest.to_json()["components"].items()
    }
    result = {
        "preset": args.preset,
        "size": args.size,
        "precision": args.precision,
        "export_seconds": round(seconds, 1),
        "peak_rss_gib": round(peak, 2),
        "components": components,
        "machine": machine(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
