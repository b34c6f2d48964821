import pytest
from google.protobuf import text_format
from helpers import cli, listing, one_error_line, snapshot
from tritonclient.grpc import model_config_pb2 as mc

from voltacache.errors import VoltacacheError
from voltacache.serving import protocol as p
from voltacache.serving.deploy import deploy
from voltacache.specs import COMPONENTS, TEXT_ENCODER

MODELS = {*COMPONENTS, p.TOKENIZER, p.DENOISER, p.POSTPROCESS, p.CACHE_SEARCH, p.TXT2IMG, p.IMG2IMG, p.INPAINT}


def read_config(repo, name):
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())


def test_repository_layout(triton_repo):
    assert {d.name for d in triton_repo.iterdir() if d.is_dir()} == MODELS
    for name in MODELS - {p.TXT2IMG, p.IMG2IMG, p.INPAINT}:
        assert (triton_repo / name / "1" / "model.py").is_file()
        assert read_config(triton_repo, name).backend == "python"


def test_configs_follow_the_specs(triton_repo, engines_dir):
    from voltacache.runtime.manifests import read_engine_manifest

    export = read_engine_manifest(engines_dir).export
    specs = p.serving_specs(export)

    def expected(tensors, name):
        if name == TEXT_ENCODER:  # Triton's dynamic batcher stacks requests along the rows: dims without them
            return [(t.name, list(t.shape[1:])) for t in tensors]
        if name in COMPONENTS:  # the engines run any number of images: the rows are -1
            return [(t.name, [-1, *t.shape[1:]]) for t in tensors]
        return [(t.name, list(t.shape)) for t in tensors]

    for name in MODELS:
        config = read_config(triton_repo, name)
        # a row per chunk of a long prompt (runtime.tokenizer)
        batching = 2 * max(export.batch_sizes) * export.max_prompt_chunks if name == TEXT_ENCODER else 0
        assert config.name == name and config.max_batch_size == batching
        assert config.HasField("dynamic_batching") == (name == TEXT_ENCODER)
        assert [(i.name, list(i.dims)) for i in config.input] == expected(specs[name].inputs, name)
        assert [(o.name, list(o.dims)) for o in config.output] == expected(specs[name].outputs, name)


def test_without_step_batching_the_repository_is_per_request(engines_dir, tmp_path):
    repo = deploy(engines_dir, tmp_path / "repo", step_batching=False, denoiser_instances=3)
    denoiser = read_config(repo, p.DENOISER)
    assert denoiser.instance_group[0].count == 3 and denoiser.parameters[p.STEP_BATCHING].string_value == "off"
    text_encoder = read_config(repo, TEXT_ENCODER)
    assert text_encoder.max_batch_size == 0 and not text_encoder.HasField("dynamic_batching")


def test_ensembles_wire_existing_models_with_response_cache(triton_repo):
    # only the prompt is required (and, on img2img and inpaint, the images that make them what they are)
    required = {name: {p.PROMPT} for name in (p.TXT2IMG, p.IMG2IMG, p.INPAINT)}
    for name in (p.TXT2IMG, p.IMG2IMG, p.INPAINT):
        config = read_config(triton_repo, name)
        # the response cache sits on the denoiser, so that postprocess can report a hit (protocol.py)
        assert config.platform == "ensemble" and not config.response_cache.enable
        steps = [s.model_name for s in config.ensemble_scheduling.step]
        assert steps == [p.TOKENIZER, "text_encoder", p.DENOISER, p.POSTPROCESS]
        produced = {i.name for i in config.input}
        for step in config.ensemble_scheduling.step:
            assert set(step.input_map.values()) <= produced, step.model_name
            produced |= set(step.output_map.values())
        assert {o.name for o in config.output} <= produced
        assert {i.name for i in config.input if not i.optional} == required[name]
    denoiser = read_config(triton_repo, p.DENOISER)
    # every denoiser input: a generation carries none of the search tensors, a search none of its own
    assert all(i.optional for i in denoiser.input) and p.SEARCH in {i.name for i in denoiser.input}
    assert {i.name for i in read_config(triton_repo, p.TOKENIZER).input if not i.optional} == {p.PROMPT}
    search = read_config(triton_repo, p.CACHE_SEARCH)
    assert {i.name for i in search.input if not i.optional} == {p.SEARCH}
    # one denoiser batches the steps of every request in flight, behind Triton's response cache
    assert denoiser.instance_group[0].count == 1 and denoiser.response_cache.enable
    assert denoiser.parameters[p.STEP_BATCHING].string_value == "on"


def test_onnxruntime_backend_option(engines_dir, tmp_path):
    repo = deploy(engines_dir, tmp_path / "repo", component_backend="onnxruntime")
    config = read_config(repo, "unet_deep")
    assert config.backend == "onnxruntime" and (repo / "unet_deep" / "1" / "model.onnx").is_file()


def test_tensorrt_backend_needs_tensorrt_engines(engines_dir, tmp_path):
    with pytest.raises(VoltacacheError, match="holds onnxruntime engines; drop the option .* or give onnxruntime"):
        deploy(engines_dir, tmp_path / "repo", component_backend="tensorrt")


def test_openvino_engines_are_served_by_the_python_backend(engines_openvino, tmp_path):
    """Triton's pip server has no OpenVINO backend: the advice names only what deploy accepts."""
    with pytest.raises(
        VoltacacheError, match=r"holds openvino engines; drop the option \(python serves any engines\)$"
    ):
        deploy(engines_openvino, tmp_path / "repo", component_backend="onnxruntime")
    assert not (tmp_path / "repo").exists()


def test_a_folder_holding_a_users_file_is_refused(engines_dir, tmp_path):
    from voltacache.errors import OutputExists

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "notes.txt").write_text("mine")
    with pytest.raises(OutputExists, match=r"--repo .*repo: not a model repository \(no voltacache.json"):
        deploy(engines_dir, repo)
    one_error_line(cli("deploy", "--engines", engines_dir, "--repo", repo), 2, f"--repo {repo}: not a model repository")
    assert listing(repo) == ["notes.txt"] and (repo / "notes.txt").read_text() == "mine"
    assert listing(tmp_path) == ["repo"]


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_a_repository_overlapping_the_engines_is_refused(engines_dir, tmp_path, where):
    import shutil

    from voltacache.runtime.engines import load_engines

    engines = shutil.copytree(engines_dir, tmp_path / "parent" / "engines")
    before = snapshot(engines)
    repo = {"same": engines, "inside": engines / "repo", "containing": tmp_path / "parent"}[where]
    message = {"same": "the same path as --engines", "inside": "inside --engines", "containing": "contains --engines"}
    one_error_line(cli("deploy", "--engines", engines, "--repo", repo), 2, f"--repo {repo}: {message[where]}")
    with pytest.raises(VoltacacheError, match=message[where]):
        deploy(engines, repo)
    assert snapshot(engines) == before
    assert set(load_engines(engines).runners) == set(COMPONENTS)
    assert listing(tmp_path / "parent") == ["engines"]


def test_deploying_twice_replaces_its_own_repository(engines_dir, tmp_path):
    from voltacache.outputs import REPOSITORY, record_owned

    repo = deploy(engines_dir, tmp_path / "repo")
    (repo / "stale" / "1").mkdir(parents=True)
    (repo / "stale" / "config.pbtxt").write_text('name: "stale"')
    record_owned(repo, REPOSITORY, "stale/config.pbtxt", "stale/1/")  # a model an earlier deploy wrote
    result = cli("deploy", "--engines", engines_dir, "--repo", repo, "--component-backend", "onnxruntime")
    assert result.exit_code == 0, result.output
    assert read_config(repo, "unet_deep").backend == "onnxruntime" and not (repo / "stale").exists()
    assert {d.name for d in repo.iterdir() if d.is_dir()} == MODELS
    assert listing(tmp_path) == ["repo"]


@pytest.mark.parametrize("extra", ["my_model/", "notes.txt", "denoiser/1/notes.txt"])
def test_a_repeated_deploy_never_deletes_what_it_did_not_write(engines_dir, tmp_path, extra):
    """A model the user added to the repository, or any file: deploy names it and writes nothing."""
    repo = deploy(engines_dir, tmp_path / "repo")
    path = repo / extra.rstrip("/")
    if extra.endswith("/"):
        (path / "1").mkdir(parents=True)
        (path / "config.pbtxt").write_text('name: "my_model"')
    else:
        path.write_text("mine")
    before = snapshot(repo)
    result = cli("deploy", "--engines", engines_dir, "--repo", repo)
    one_error_line(result, 2, f"--repo {repo}: holds {extra}, which voltacache did not write there")
    assert snapshot(repo) == before


def test_registered_loras_survive_a_repeated_deploy(engines_dir, lora_files, tmp_path):
    from voltacache.pipeline.lora import read_registry

    repo = tmp_path / "repo"
    assert (
        cli("deploy", "--engines", engines_dir, "--repo", repo, "--lora", f"style={lora_files['style']}").exit_code == 0
    )
    registered = (repo / p.LORA_FOLDER / "style.safetensors").read_bytes()
    # a new deploy without --lora (say, another cache setting) keeps them; --lora adds to them
    result = cli("deploy", "--engines", engines_dir, "--repo", repo, "--lora", f"other={lora_files['other']}")
    assert result.exit_code == 0, result.output
    assert set(read_registry(repo / p.LORA_FOLDER)) == {"style", "other"}
    assert (repo / p.LORA_FOLDER / "style.safetensors").read_bytes() == registered
    assert cli("deploy", "--engines", engines_dir, "--repo", repo, "--no-step-batching").exit_code == 0
    assert set(read_registry(repo / p.LORA_FOLDER)) == {"style", "other"}
    # unregistered by name only
    result = cli("deploy", "--engines", engines_dir, "--repo", repo, "--drop-lora", "style")
    assert result.exit_code == 0, result.output
    assert set(read_registry(repo / p.LORA_FOLDER)) == {"other"}
    one_error_line(
        cli("deploy", "--engines", engines_dir, "--repo", repo, "--drop-lora", "nope"),
        2,
        f"--drop-lora nope: not registered in --repo {repo} (registered: other)",
    )


def test_lora_options_that_do_nothing_are_refused(engines_dir, tmp_path):
    repo = tmp_path / "repo"
    result = cli("deploy", "--engines", engines_dir, "--repo", repo, "--lora-resident", "3")
    one_error_line(result, 2, "--lora-resident: only with LoRAs to keep resident; register them with --lora")
    result = cli(
        "deploy", "--engines", engines_dir, "--repo", repo, "--no-step-batching", "--denoiser-instances", "100"
    )
    one_error_line(result, 2, "--denoiser-instances 100: use 1 to 32")
    assert not repo.exists()


def test_a_repository_inside_the_engines_or_an_export_is_refused(engines_dir, onnx_fp32, tmp_path):
    result = cli("deploy", "--engines", engines_dir, "--repo", onnx_fp32 / "repo")
    one_error_line(result, 2, f"--repo {onnx_fp32 / 'repo'}: inside the export {onnx_fp32}")


def test_a_failed_deploy_leaves_the_earlier_repository_whole(engines_dir, tmp_path, monkeypatch):
    from voltacache.serving import deploy as deploy_module

    repo = deploy(engines_dir, tmp_path / "repo")
    before = snapshot(repo)
    calls = []

    def install_adapter(folder, adapter):
        calls.append(folder)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(deploy_module, "install_adapter", install_adapter)
    with pytest.raises(OSError, match="No space left"):
        deploy(engines_dir, repo)
    assert calls[0].parent.name.startswith(".repo.tmp-")
    assert snapshot(repo) == before
    assert listing(tmp_path) == ["repo"]


def test_a_cache_inside_the_repository_is_refused(engines_dir, tmp_path):
    from voltacache.cache.layers import CacheSettings

    with pytest.raises(VoltacacheError, match="--cache .*cache.db: inside --repo"):
        deploy(engines_dir, tmp_path / "repo", cache=CacheSettings(str(tmp_path / "repo" / "cache.db")))
    assert listing(tmp_path) == []


def test_denoiser_instances_need_no_step_batching(engines_dir, tmp_path):
    result = cli("deploy", "--engines", engines_dir, "--repo", tmp_path / "repo", "--denoiser-instances", "3")
    one_error_line(result, 2, "--denoiser-instances 3", "--no-step-batching")
    assert not (tmp_path / "repo").exists()
