"""No prompt or completion text in the Ray session logs by default.

Why: prompts and completions are users' data, and logs are kept, shipped and
read by people who should not see them. vLLM can log every request's prompt
and sampling parameters (its request logger), Ray Serve writes access and
replica logs, and error paths log exceptions that may quote the input. This
sends real traffic (chat and completions, plain and streamed, accepted and
refused) whose prompts carry a unique marker, reads the completions' text,
then greps every file under the session's log directory for both.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest

from deployments.config.app_args import app_args_from_serve_config

pytestmark = [pytest.mark.integration]

LOG_ROOT = Path("/tmp/ray/session_latest/logs")
MARKER = f"zq{uuid.uuid4().hex[:12]}marker"
PROMPT = f"Write one sentence about the purple giraffe named {MARKER} who lives in Lisbon."
MIN_LEAK_CHARS = 16  # shorter completion fragments could match ordinary log text by chance


def post(base_url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base_url + path, json=body, timeout=120)


def completions_text(base_url: str, model_id: str) -> list[str]:
    """Serve the marked prompt every way a client can; return the completion texts."""
    chat = {"model": model_id, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
            "temperature": 0}
    completion = {"model": model_id, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    texts = [post(base_url, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"],
             post(base_url, "/v1/completions", completion).json()["choices"][0]["text"]]
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        with httpx.stream("POST", base_url + path, json={**body, "stream": True}, timeout=120) as response:
            assert response.status_code == 200
            for _ in response.iter_lines():
                pass
    return texts


def refused(base_url: str, model_id: str) -> list[int]:
    """Requests carrying the marker that the router, the request model and the engine refuse."""
    messages = [{"role": "user", "content": PROMPT}]
    bodies = [
        ("/v1/chat/completions", {"model": model_id, "messages": messages, "temperature": 9}),   # router
        ("/v1/chat/completions", {"model": model_id, "messages": messages, "n": MARKER}),         # request model
        ("/v1/completions", {"model": model_id, "prompt": PROMPT, "min_tokens": 5, "max_tokens": 2}),  # engine
        ("/v1/completions", {"model": model_id, "prompt": PROMPT, "stop": MARKER, "suffix": MARKER}),
    ]
    return [post(base_url, path, body).status_code for path, body in bodies]


def log_files() -> list[Path]:
    return [p for p in LOG_ROOT.resolve().rglob("*") if p.is_file()]


def files_containing(needle: str) -> list[str]:
    escaped = json.dumps(needle)[1:-1]  # as a JSON or repr()-style log line would write it
    found = []
    for path in log_files():
        data = path.read_bytes().decode("utf-8", errors="replace")
        if needle in data or escaped in data:
            found.append(str(path))
    return found


def leak_fragments(text: str) -> list[str]:
    """The parts of a completion long enough that finding one in a log means it leaked."""
    return [line.strip() for line in text.splitlines() if len(line.strip()) >= MIN_LEAK_CHARS]


def test_no_prompt_or_completion_text_in_logs(base_url, model_id):
    texts = completions_text(base_url, model_id)
    statuses = refused(base_url, model_id)
    assert all(400 <= s < 500 for s in statuses), statuses
    fragments = [f for text in texts for f in leak_fragments(text)]
    assert fragments, f"completions too short to look for: {texts}"
    time.sleep(3)  # replicas' log handlers write asynchronously
    assert log_files(), f"no Ray session logs under {LOG_ROOT}"
    assert not files_containing(MARKER), f"the prompt's marker is logged in {files_containing(MARKER)}"
    for fragment in fragments:
        assert not files_containing(fragment), f"completion text {fragment!r} is logged in {files_containing(fragment)}"


@pytest.mark.parametrize("profile", sorted(app_args_from_serve_config().profiles))
def test_every_profile_leaves_vllm_request_logging_off(profile):
    # vLLM's request logger writes each prompt (and its token ids) at INFO; the
    # engine args Ray builds from a profile must keep it off, whatever the defaults become.
    llm_config = app_args_from_serve_config().profiles[profile].to_llm_config()
    kwargs = llm_config.get_engine_config().get_initialization_kwargs()
    assert kwargs.get("enable_log_requests") is False


def test_the_routers_engine_load_polls_leave_no_access_lines_while_requests_do(base_url, model_id):
    # Two polls a second per router replica would otherwise fill the LLM replicas' logs and `serve run`'s console.
    post(base_url, "/v1/chat/completions", {"model": model_id, "max_tokens": 1,
                                            "messages": [{"role": "user", "content": "Hi"}]})
    time.sleep(3)  # several polls, and the replicas' log handlers write asynchronously
    llm_logs = list((LOG_ROOT / "serve").glob("replica_llm_ObservedLLMServer*.log"))
    assert llm_logs, f"no LLM replica logs under {LOG_ROOT / 'serve'}"
    lines = [line for path in llm_logs for line in path.read_text(errors="replace").splitlines()]
    assert not [line for line in lines if " engine_load " in line and "CALL" in line]
    assert [line for line in lines if "CALL chat " in line], "no request access line"
