"""The bundled model cache: complete caches are reused, partial or corrupt ones are rebuilt."""

import json

import pytest

from welfare_server.model import bundled


def test_complete_cache_is_reused_without_work(bundled_model_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a complete cache must not be fetched again")

    monkeypatch.setattr(bundled, "fetch_gguf", refuse)
    assert bundled.ensure_default_model() == bundled_model_dir
    manifest = json.loads((bundled_model_dir / bundled.MANIFEST_NAME).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])


def _fake_model_dir(tmp_path):
    """A directory with a manifest in the module's format over two small files."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 1000)
    files = {p.name: {"size": p.stat().st_size, "sha256": bundled._sha256(p)} for p in model_dir.iterdir()}
    manifest = {"format": bundled.MANIFEST_FORMAT, "source": bundled.dataclasses.asdict(bundled.DEFAULT_MODEL),
                "files": files}
    (model_dir / bundled.MANIFEST_NAME).write_text(json.dumps(manifest))
    return model_dir


def test_manifest_detects_partial_and_corrupt_files(tmp_path):
    model_dir = _fake_model_dir(tmp_path)
    assert bundled.is_complete(model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"\x00" * 999)  # truncated
    assert not bundled.is_complete(model_dir)
    weights.write_bytes(b"\x00" * 998 + b"\x01\x00")  # same size, other bytes
    assert not bundled.is_complete(model_dir)
    weights.unlink()  # missing
    assert not bundled.is_complete(model_dir)
    (model_dir / bundled.MANIFEST_NAME).write_text("{not json")
    assert not bundled.is_complete(model_dir)


@pytest.mark.real_model
def test_partial_cache_is_rebuilt_and_loads(tmp_path, monkeypatch):
    # A conversion that died half way: config only, no manifest.
    monkeypatch.setenv(bundled.CACHE_ENV_VAR, str(tmp_path))
    partial = tmp_path / bundled.DEFAULT_MODEL.cache_subdir
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    model_dir = bundled.ensure_default_model()
    assert model_dir == partial and bundled.is_complete(model_dir)
    assert not list(tmp_path.glob("models/.building-*")), "scratch directories must be removed"

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
