"""README's path on the real default model with the default config: `tide up`, a completion and a
streamed chat completion through the official `openai` client, `tide status`, `tide down`.

Run once with `model.bf16_kernel=always` (tide's kernels, on any AVX2 CPU) and once with `never`
(torch's bf16 path): the default `make up` once crashed on the first (the trainer could not copy a
head on the kernels) while every test used tiny fp32 models."""

import json
import os
import time

import pytest

from serving.launcher import session_members
from tests.conftest import tide_cli
from tide import kernels
from tide.config import DecodeConfig, ModelConfig
from tide.transport.redis_server import free_port, process_start_time

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("kernel", ["always", "never"])
def test_make_up_default_config_serves_openai_clients(kernel, tmp_path):
    if kernel == "always" and not kernels.can_run():
        pytest.skip("tide.kernels needs an x86 CPU with AVX2")
    from openai import OpenAI

    run_dir, port = tmp_path / "run", free_port()
    env = {**os.environ, "WANDB_SILENT": "true"}
    for key in ("WANDB_API_KEY", "TIDE_API_KEY", "TIDE_REDIS_URL"):
        env.pop(key, None)
    # the defaults, but for the port (tests run beside each other) and the kernel under test
    up = tide_cli("up", "--run-dir", str(run_dir), f"serving.port={port}", f"model.bf16_kernel={kernel}", env=env)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        prompt = "The capital of France is"
        out = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=16, temperature=0)
        text = out.choices[0].text
        assert text and out.usage.completion_tokens >= 1
        assert out.usage.model_extra["tide"]["draft_version"] >= 0
        if kernel == "always":  # row-stable kernels: speculation emits the bf16 target's own tokens
            from tide.models import load_target
            from tide.speculative import target_generate

            target = load_target(ModelConfig(bf16_kernel="always"))
            ids = target.tokenizer(prompt)["input_ids"]
            want = target_generate(target, ids, DecodeConfig(max_new_tokens=16)).tokens
            assert text == target.tokenizer.decode(want, skip_special_tokens=True)
        msgs = [{"role": "user", "content": "Name three colours."}]
        chunks = list(client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=16,
                                                     temperature=0, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed.strip() and chunks[-1].choices[0].finish_reason in ("stop", "length")
        deadline = time.time() + 30
        while True:  # status.json is rewritten every second
            st = tide_cli("status", "--run-dir", str(run_dir), env=env)
            assert st.returncode == 0, st.stdout + st.stderr
            status = json.loads(st.stdout)
            if status["requests"] >= 2 or time.time() > deadline:
                break
            time.sleep(1)
        assert status["state"] == "ready" and status["requests"] == 2
        trainer = status["trainer"]
        assert trainer and "error" not in trainer and trainer["enabled"], trainer  # the trainer is alive
        pid = status["pid"]
    finally:
        down = tide_cli("down", "--run-dir", str(run_dir), env=env)
    assert down.returncode == 0, down.stderr
    assert process_start_time(pid) is None  # gone (or a zombie nobody reaped: dead all the same)
    assert not session_members(pid)  # and everything it started with it
