"""Seeded sampling that survives chunked prefill on vLLM's CPU engine.

While a prompt is prefilled in chunks, vLLM still samples a token for it after
every chunk and throws that token away; to keep a seeded request's output the
same however its prompt was chunked, the model runner then rewinds the
request's ``torch.Generator`` with ``set_offset(get_offset() - 4)``
(``GPUModelRunner._bookkeeping_sync``). Only CUDA's Philox generators have an
offset: on the CPU engine that call raises "CPU Generator does not use
offset", which kills the EngineCore for every request on the replica. The CPU
profile chunks every chat prompt (``long_prefill_token_threshold``), so any
request with ``seed`` and a temperature did that.

``make_seeded_sampling_safe`` runs inside each vLLM worker (the replica adds
``worker_extension.WorkerExtension`` as vLLM's ``worker_extension_cls`` and calls it with
``collective_rpc`` before it warms up) and patches that worker's model runner,
and only where the rewind would fail: the sampling of a step is
wrapped so that the generators of requests whose token will be discarded get
their exact state back afterwards (the rewind, done with ``get_state`` /
``set_state``, which CPU generators have), and vLLM's own offset rewind then
sees no generators to touch. On GPUs, or a torch whose CPU generators have
offsets, or a vLLM without this code path, it changes nothing.
"""

from __future__ import annotations

import functools
from typing import Any

_PATCHED = "_llm_serving_seeded_sampling_safe"


def generator_lacks_offset(device: Any) -> bool:
    """True where a ``torch.Generator`` on ``device`` cannot ``get_offset``, as vLLM's rewind needs."""
    import torch

    try:
        torch.Generator(device=device).get_offset()
    except RuntimeError:
        return True
    return False


def _why_not_needed(runner: Any) -> str | None:
    if runner is None:
        return "no model runner"
    if getattr(runner, _PATCHED, False):
        return "already patched"
    for name in ("_sample", "_bookkeeping_sync", "discard_request_mask", "input_batch"):
        if not hasattr(runner, name):
            return f"this vLLM's model runner has no {name}"  # another code path: nothing to fix
    if not generator_lacks_offset(runner.device):
        return f"{runner.device} generators have offsets"
    return None


def discarded_generators(runner: Any) -> list:
    """The generators of the requests whose token this step will discard (mid-prefill chunks)."""
    batch = runner.input_batch
    mask = runner.discard_request_mask.np[: batch.num_reqs]
    return [batch.generators[i] for i in mask.nonzero()[0].tolist() if i in batch.generators]


def make_seeded_sampling_safe(worker: Any) -> str:
    """Patch ``worker``'s model runner if vLLM's generator rewind would fail there; says what it did."""
    runner = getattr(worker, "model_runner", None)
    reason = _why_not_needed(runner)
    if reason is not None:
        return f"unchanged: {reason}"
    runner._sample = _rewinding_sample(runner._sample, runner)
    runner._bookkeeping_sync = _without_offset_rewind(runner._bookkeeping_sync, runner)
    setattr(runner, _PATCHED, True)
    return f"patched: seeded requests rewind {runner.device} generators by state"


def _rewinding_sample(sample, runner):
    @functools.wraps(sample)
    def wrapper(*args, **kwargs):
        saved = [(gen, gen.get_state()) for gen in discarded_generators(runner)]
        output = sample(*args, **kwargs)
        for gen, state in saved:
            gen.set_state(state)  # as if the discarded token had never been drawn
        return output

    return wrapper


def _without_offset_rewind(bookkeeping, runner):
    @functools.wraps(bookkeeping)
    def wrapper(*args, **kwargs):
        # The rewind already happened in _sample; hide the generators from
        # vLLM's offset rewind, the only reader of them in this method.
        batch = runner.input_batch
        generators, batch.generators = batch.generators, {}
        try:
            return bookkeeping(*args, **kwargs)
        finally:
            batch.generators = generators

    return wrapper
