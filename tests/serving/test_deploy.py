import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from voltacache.errors import VoltacacheError
from voltacache.serving import protocol as p
from voltacache.serving.deploy import deploy
from voltacache.specs import COMPONENTS

MODELS = {*COMPONENTS, p.TOKENIZER, p.DENOISER, p.POSTPROCESS, p.TXT2IMG, p.IMG2IMG}


def read_config(repo, name):
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())


def test_repository_layout(triton_repo):
    assert {d.name for d in triton_repo.iterdir() if d.is_dir()} == MODELS
    for name in MODELS - {p.TXT2IMG, p.IMG2IMG}:
        assert (triton_repo / name / "1" / "model.py").is_file()
        assert read_config(triton_repo, name).backend == "python"


def test_configs_follow_the_specs(triton_repo, engines_dir):
    import json

    export = json.loads((engines_dir / "engines.json").read_text())["export"]
    specs = p.serving_specs(export)
    for name in MODELS:
        config = read_config(triton_repo, name)
        assert config.name == name and config.max_batch_size == 0
        assert [(i.name, list(i.dims)) for i in config.input] == [(t.name, list(t.shape)) for t in specs[name].inputs]
        assert [(o.name, list(o.dims)) for o in config.output] == [(t.name, list(t.shape)) for t in specs[name].outputs]


def test_ensembles_wire_existing_models_with_response_cache(triton_repo):
    for name in (p.TXT2IMG, p.IMG2IMG):
        config = read_config(triton_repo, name)
        assert config.platform == "ensemble" and config.response_cache.enable
        steps = [s.model_name for s in config.ensemble_scheduling.step]
        assert steps == [p.TOKENIZER, "text_encoder", p.DENOISER, p.POSTPROCESS]
        produced = {i.name for i in config.input}
        for step in config.ensemble_scheduling.step:
            assert set(step.input_map.values()) <= produced, step.model_name
            produced |= set(step.output_map.values())
        assert {o.name for o in config.output} <= produced
    denoiser = read_config(triton_repo, p.DENOISER)
    assert {i.name for i in denoiser.input if i.optional} == {p.INIT_IMAGE, p.STRENGTH}
    assert denoiser.instance_group[0].count == 2


def test_onnxruntime_backend_option(engines_dir, tmp_path):
    repo = deploy(engines_dir, tmp_path / "repo", component_backend="onnxruntime")
    config = read_config(repo, "unet_deep")
    assert config.backend == "onnxruntime" and (repo / "unet_deep" / "1" / "model.onnx").is_file()


def test_tensorrt_backend_needs_tensorrt_engines(engines_dir, tmp_path):
    with pytest.raises(VoltacacheError, match="holds onnxruntime engines"):
        deploy(engines_dir, tmp_path / "repo", component_backend="tensorrt")
