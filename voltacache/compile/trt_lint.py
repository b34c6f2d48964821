"""TensorRT readiness, checked without TensorRT: supported ops, static shapes, the 2 GB protobuf limit.

Static but for the leading dimension of graph inputs and outputs named `specs.ROWS`, which the engine
builder fixes with one optimization profile per batch size, and the context's prompt axis named
`specs.PROMPT_TOKENS`, which every profile spans (min and opt one chunk, max --max-prompt-chunks), and
the height and width of image-shaped tensors of an export for several sizes (a profile per size).

The operator list is the ONNX-TensorRT parser's support matrix (onnx-tensorrt docs/operators.md at
the 10.1 GA release, the ops marked Y), plus the ONNX `Attention` op (opset 23), which the parser
accepts from TensorRT 10.14 on (its release notes). Older TensorRT fuses the unfused form
(`--opset 18`: MatMul/Softmax/MatMul) by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..specs import PROMPT_AXIS, PROMPT_TOKENS, ROWS, SPATIAL, SPATIAL_AXES

TARGET_TENSORRT = "10.14"
PROTOBUF_LIMIT = 2 * 1024**3

TRT_10_1_OPS = set(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
    Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND
    Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
    HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization
    LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow
    PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
    ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
    Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
    Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
    Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor""".split()
)
SUPPORTED_OPS = {"10.1": TRT_10_1_OPS, "10.14": TRT_10_1_OPS | {"Attention"}}


@dataclass
class LintReport:
    file: str
    tensorrt: str
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    dynamic_dims: list[str] = field(default_factory=list)
    size_bytes: int = 0
    external_data: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"{self.file}: ready for TensorRT {self.tensorrt} (all ops supported, static shapes but {ROWS})"
        return f"{self.file}: " + "; ".join(self.problems)


def lint(path: Path, tensorrt: str = TARGET_TENSORRT) -> LintReport:
    """Check one ONNX file; every finding lands in `problems`."""
    path = Path(path)
    supported = SUPPORTED_OPS[tensorrt]
    model = onnx.load(str(path), load_external_data=False)
    data_files = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    size = path.stat().st_size + sum((path.parent / f).stat().st_size for f in data_files)
    report = LintReport(path.name, tensorrt, size_bytes=size, external_data=bool(data_files))
    for node in _all_nodes(model.graph):
        if node.domain in ("", "ai.onnx") and node.op_type not in supported:
            report.unsupported_ops[node.op_type] = report.unsupported_ops.get(node.op_type, 0) + 1
        elif node.domain not in ("", "ai.onnx"):
            key = f"{node.domain}.{node.op_type}"
            report.unsupported_ops[key] = report.unsupported_ops.get(key, 0) + 1
    for value in [*model.graph.input, *model.graph.output]:
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            profiled = (
                (i == 0 and dim.dim_param == ROWS)
                or (i == PROMPT_AXIS.get(value.name) and dim.dim_param == PROMPT_TOKENS)
                or (i in SPATIAL_AXES and value.name in SPATIAL and bool(dim.dim_param))
            )
            if profiled:
                continue  # a profile per (size, batch size) fixes rows and sides; each spans the prompt's chunks
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                report.dynamic_dims.append(f"{value.name}[{i}]={dim.dim_param or '?'}")
    if report.unsupported_ops:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(report.unsupported_ops.items()))
        report.problems.append(f"ops TensorRT {tensorrt} does not support: {ops}")
    if report.dynamic_dims:
        dims = ", ".join(report.dynamic_dims)
        spanned = f"{ROWS}, {PROMPT_TOKENS} and image sides"
        report.problems.append(f"dynamic dimensions besides {spanned} (the profiles span only those): {dims}")
    if path.stat().st_size >= PROTOBUF_LIMIT:
        report.problems.append(f"{path.stat().st_size / 1e9:.2f} GB in one protobuf: save the weights as external data")
    return report


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)
