import onnx
from onnx import TensorProto, helper

from voltacache.compile import trt_lint
from voltacache.specs import CONTEXT, PROMPT_TOKENS, ROWS


def write(tmp_path, nodes, inputs, outputs, name="m.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_reports_unsupported_op_and_dynamic_dims(tmp_path):
    path = write(
        tmp_path,
        [helper.make_node("Unique", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None])],
    )
    report = trt_lint.lint(path)
    assert not report.ok
    assert report.unsupported_ops == {"Unique": 1}
    assert "x[0]=batch" in report.dynamic_dims
    assert "Unique x1" in report.summary()


def test_only_the_leading_rows_dimension_may_be_dynamic(tmp_path):
    # the engine builder fixes `rows` with one profile per batch size; any other dynamic dimension it cannot
    path = write(
        tmp_path,
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, 4])],
    )
    assert trt_lint.lint(path).ok
    path = write(
        tmp_path,
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, ROWS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, ROWS])],
        name="inner.onnx",
    )
    report = trt_lint.lint(path)
    assert report.dynamic_dims == ["x[1]=rows", "y[1]=rows"] and not report.ok


def test_the_context_may_span_prompt_chunks_on_its_prompt_axis_only(tmp_path):
    # every profile spans the context's prompt tokens (one chunk to --max-prompt-chunks); no other input's
    path = write(
        tmp_path,
        [helper.make_node("Relu", [CONTEXT], ["y"]), helper.make_node("Relu", ["x"], ["z"])],
        [
            helper.make_tensor_value_info(CONTEXT, TensorProto.FLOAT, [ROWS, PROMPT_TOKENS, 8]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, PROMPT_TOKENS]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, PROMPT_TOKENS, 8]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [ROWS, PROMPT_TOKENS]),
        ],
    )
    report = trt_lint.lint(path)
    assert report.dynamic_dims == [f"x[1]={PROMPT_TOKENS}", f"y[1]={PROMPT_TOKENS}", f"z[1]={PROMPT_TOKENS}"]


def test_attention_needs_tensorrt_10_14(tmp_path):
    path = write(
        tmp_path,
        [helper.make_node("Attention", ["q", "k", "v"], ["o"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 3, 4]) for n in "qkv"],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 2, 3, 4])],
    )
    assert trt_lint.lint(path, "10.14").ok
    assert trt_lint.lint(path, "10.1").unsupported_ops == {"Attention": 1}


def test_big_file_without_external_data(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    monkeypatch.setattr(trt_lint, "PROTOBUF_LIMIT", 10)
    assert any("external data" in p for p in trt_lint.lint(path).problems)
