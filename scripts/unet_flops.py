"""Count the multiply-accumulates of an exported ONNX graph (Conv, MatMul, Gemm, Attention), from shapes alone.

    .venv/bin/python scripts/unet_flops.py build/sd15/onnx_fp32/unet_deep.onnx

Weights stay on disk: only the graph is loaded and shape-inferred. FLOPs = 2 x MACs. This is the
physical floor's numerator in docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from math import prod

import onnx


def shapes(model, batch: int | None = None) -> dict[str, list[int]]:
    """Every tensor's shape. ONNX's inference loses a dynamic batch through the exported Reshapes (their
    target shapes are computed): a leading dimension it leaves unknown is the batch, when one is given."""
    graph = model.graph
    known = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if batch and dims and not dims[0]:
            dims[0] = batch
        known[value.name] = dims
    for init in graph.initializer:
        known[init.name] = list(init.dims)
    return known


def macs(model, batch: int | None = None) -> dict[str, int]:
    known = shapes(model, batch)
    totals = {}
    for node in model.graph.node:
        out = known.get(node.output[0])
        if not out or 0 in out:
            continue
        if node.op_type == "Conv":
            weight = known[node.input[1]]  # (out_ch, in_ch / groups, kh, kw)
            n = prod(out) * prod(weight[1:])
        elif node.op_type in ("MatMul", "Gemm"):
            a = known[node.input[0]]
            n = prod(out) * a[-1]
        elif node.op_type == "Attention":
            q, k = known[node.input[0]], known[node.input[1]]  # (B, heads, S, d) or (B, S, hidden)
            if len(q) == 4:
                n = 2 * q[0] * q[1] * q[2] * k[2] * q[3]  # QK^T and PV
            else:
                n = 2 * q[0] * q[1] * k[1] * q[2]
        else:
            continue
        totals[node.op_type] = totals.get(node.op_type, 0) + n
    return totals


def main(path: str) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 2  # dynamic: one guidance pair
    totals = macs(model, batch)
    flops = 2 * sum(totals.values())
    for op, n in sorted(totals.items()):
        print(f"{op:>10}: {2 * n / 1e12:8.3f} TFLOP")
    print(f"total: {flops / 1e12:.3f} TFLOP per call (batch {batch}), {flops / batch / 1e12:.3f} per sample")


if __name__ == "__main__":
    main(sys.argv[1])
