"""The Serve options each 4090D profile computes: bundles, strategy, env, engine args."""

from __future__ import annotations

import pytest

from deployments.config.app_args import app_args_from_serve_config

PROFILES = app_args_from_serve_config().profiles
EXPECTED = {  # profile: (tensor parallel, quantization, max_model_len)
    "qwen2.5-7b-4090d-tp1-fp16": (1, None, 8192),
    "qwen2.5-7b-4090d-tp1-awq": (1, "awq_marlin", 32768),
    "qwen2.5-7b-4090d-tp1-nf4": (1, "bitsandbytes", 32768),
    "qwen2.5-7b-4090d-tp2-fp16": (2, None, 32768),
    "qwen2.5-7b-4090d-tp4-fp16": (4, None, 131072),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gpu_profile_options(name):
    tp, quantization, max_len = EXPECTED[name]
    llm_config = PROFILES[name].to_llm_config()
    engine = llm_config.get_engine_config()
    assert engine.placement_strategy == "STRICT_PACK"  # a group never spans nodes
    assert engine.placement_bundles == [{"GPU": 1.0, "CPU": 2.0, "gpu_4090d": 1}] * tp
    kwargs = llm_config.engine_kwargs
    assert kwargs["tensor_parallel_size"] == tp
    assert kwargs.get("quantization") == quantization
    assert kwargs["max_model_len"] == max_len
    assert kwargs["dtype"] == "float16" and kwargs["scheduling_policy"] == "priority"
    env = (llm_config.runtime_env or {}).get("env_vars", {})
    if tp > 1:  # PCIe consumer cards: no P2P, no custom all-reduce
        assert env["NCCL_P2P_DISABLE"] == "1" and kwargs["disable_custom_all_reduce"] is True
    else:
        assert "NCCL_P2P_DISABLE" not in env


def test_nf4_quantises_at_load_time_from_the_fp16_checkpoint():
    loading = PROFILES["qwen2.5-7b-4090d-tp1-nf4"].llm_config["model_loading_config"]
    assert loading["model_source"] == "Qwen/Qwen2.5-7B-Instruct"
    assert PROFILES["qwen2.5-7b-4090d-tp1-nf4"].llm_config["engine_kwargs"]["load_format"] == "bitsandbytes"


def test_awq_uses_a_prequantised_checkpoint():
    assert PROFILES["qwen2.5-7b-4090d-tp1-awq"].llm_config["model_loading_config"]["model_source"].endswith("-AWQ")
