"""The layout is the architecture: layers that never import upward nor in a circle (import-linter, with the
contracts in pyproject.toml), and served processes that load what runs engines without torch or onnx."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from voltacache.serving import protocol as p
from voltacache.serving.deploy import python_config
from voltacache.specs import UNET_DEEP

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    """compile / runtime / pipeline / serving / cache in layers, no circle, the runtime free of torch and onnx."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


# Each served model below, started as the Python backend starts it (its config as Triton hands it over), in
# a fresh interpreter: what it imported, how long it took and how much memory it holds.
LOAD = """
import json, re, sys, time
sys.path.insert(0, {tests!r})
started = time.perf_counter()
from serving import pb_utils_stub
sys.modules["triton_python_backend_utils"] = pb_utils_stub
from voltacache.serving import python_models
model = getattr(python_models, {model!r})()
model.initialize(json.load(open({args!r})))
{extra}
heavy = sorted(m for m in ("torch", "onnx", "diffusers", "transformers") if m in sys.modules)
peak = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024  # this image's
print(json.dumps({{"heavy": heavy, "seconds": time.perf_counter() - started, "rss_mb": peak}}))
"""


def served_load(tmp_path, engines_dir, model: str, name: str, extra: str = "") -> dict:
    from voltacache.runtime.manifests import read_engine_manifest

    spec = p.serving_specs(read_engine_manifest(engines_dir).export)[name]
    config = python_config(spec, engines_dir)
    from google.protobuf.json_format import MessageToJson

    args = {
        "model_config": MessageToJson(config, preserving_proto_field_name=True),
        "model_instance_kind": "CPU",
        "model_instance_name": f"{name}_0_0",
        "model_instance_device_id": "0",
        "model_repository": str(tmp_path / name),
        "model_version": "1",
        "model_name": name,
    }
    (tmp_path / "args.json").write_text(json.dumps(args))
    code = LOAD.format(tests=str(ROOT / "tests"), model=model, args=str(tmp_path / "args.json"), extra=extra)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "model, name",
    [("ComponentModel", UNET_DEEP), ("TokenizerModel", p.TOKENIZER), ("PostprocessModel", p.POSTPROCESS)],
)
def test_a_served_model_loads_its_engine_without_torch_or_onnx(model, name, engines_dir, tmp_path):
    """`import voltacache.build` once pulled torch and onnx into every served process (2.2 s, 289 MB): the
    runtime is apart from the compiler now, and the tokenizer reads tokenizer.json without transformers (1 s). (The
    denoiser runs the pipeline, whose schedulers are torch's.)"""
    loaded = served_load(tmp_path, engines_dir, model, name)
    assert loaded["heavy"] == [], loaded
    print(f"{model} ({name}): {loaded['seconds']:.2f} s, {loaded['rss_mb']:.0f} MB")


def test_the_query_encoder_and_the_cache_search_model_need_no_torch(engines_dir, tmp_path):
    from voltacache.cache.layers import CacheSettings

    # the sentence embedder is torch's (sentence-transformers); the clip embedder reads the text encoder
    settings = CacheSettings(str(tmp_path / "cache.db"), embedder="clip")
    config_extra = "\n".join(f"model.parameters[{k!r}] = {v!r}" for k, v in settings.parameters().items())
    encode = (
        "from voltacache.cache.search import QueryEncoder\n"
        f"QueryEncoder.from_engines({str(engines_dir)!r}).pooled('a red circle')\n"
    )
    loaded = served_load(tmp_path, engines_dir, "CacheSearchModel", p.CACHE_SEARCH, config_extra + "\n" + encode)
    assert loaded["heavy"] == [], loaded
