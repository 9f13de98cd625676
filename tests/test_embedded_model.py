"""The embedded model folder: prepared once, reused, broken folders explained."""

from __future__ import annotations

import json
import shutil

import pytest

from deployments.models import embedded
from deployments.models.embedded import EmbeddedModelError, check_model_dir, prepare, resolve_source


def test_prepared_folder_is_complete_bf16_with_chat_template():
    path = prepare()  # the Makefile prepared it; this must be a cache hit
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert (path / "chat_template.jinja").read_text().count("<|im_start|>") >= 2
    assert list(path.glob("*.safetensors"))
    # readable by whoever may read its config (safetensors alone would leave the weights 0600)
    assert {f.stat().st_mode & 0o777 for f in path.iterdir()} == {(path / "config.json").stat().st_mode & 0o777}


def test_prepare_reuses_the_cache(monkeypatch):
    def must_not_convert(*a, **k):
        raise AssertionError("converted again although the folder was complete")

    monkeypatch.setattr(embedded, "gguf_path", must_not_convert)
    assert prepare() == embedded.model_dir()


def test_resolve_source_passes_hub_ids_and_paths_through():
    assert resolve_source("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_source("/models/qwen") == "/models/qwen"
    assert resolve_source("embedded:smollm2-135m-instruct") == str(embedded.model_dir())


def test_unknown_embedded_name():
    with pytest.raises(EmbeddedModelError, match="only embedded model"):
        resolve_source("embedded:llama-9000")


def test_missing_folder(tmp_path):
    with pytest.raises(EmbeddedModelError, match="does not exist.*prepare"):
        check_model_dir(tmp_path / "absent")


@pytest.mark.parametrize("damage", ["weights", "config", "marker", "bad_json"])
def test_broken_folder(tmp_path, damage):
    broken = tmp_path / "model"
    shutil.copytree(embedded.model_dir(), broken)
    if damage == "weights":
        for f in broken.glob("*.safetensors"):
            f.unlink()
    elif damage == "config":
        (broken / "config.json").unlink()
    elif damage == "marker":
        (broken / embedded.COMPLETE_MARKER).unlink()
    else:
        (broken / "config.json").write_text("{not json")
    with pytest.raises(EmbeddedModelError, match="prepare"):
        check_model_dir(broken)
