"""`peft serve` driven by the official `openai` Python client (CI installs it: clients/requirements.txt).

    python clients/openai_client_test.py target/debug/peft

Trains two LoRA adapters on the bundled tiny model (`peft train`, a few steps each), starts
`peft serve` on 127.0.0.1 with them, an API key and an adapter folder, and checks: the models
list, completions and chat (whole and streamed) equal to `peft generate` run alone, log-probabilities
(`logprobs`, `top_logprobs`, `echo` with `max_tokens: 0`) equal to `peft logits`, every error
case as the client's exception class, runtime adapter loading and unloading, the bounded queue
(429), and a graceful exit on SIGTERM. Exits non-zero on the first failure.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import openai
from openai import OpenAI

KEY = "test-key-123"


def run(*args):
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def expect_error(kind, call):
    try:
        call()
    except kind as e:
        return e
    except openai.APIStatusError as e:
        sys.exit(f"expected {kind.__name__}, got {type(e).__name__}: {e}")
    sys.exit(f"expected {kind.__name__}, the call succeeded")


def metric(base, name):
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    sys.exit(f"{name} missing from /metrics")


def wait_for(what, condition):
    start = time.time()
    while not condition():
        if time.time() - start > 60:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.01)


def main():
    peft = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/debug/peft")
    work = tempfile.mkdtemp(prefix="peft-serve-")
    # Two adapters trained here on the bundled model (different seeds and rates).
    for name, seed, lr in [("zh", "1", "0.01"), ("en", "2", "0.02")]:
        run(peft, "train", "--max-steps", "4", "--seed", seed, "--learning-rate", lr,
            "--output", os.path.join(work, name))
    model = os.path.join(work, "zh", "bundled", "model")
    adapters = os.path.join(work, "adapters")
    shutil.copytree(os.path.join(work, "en", "adapter"), os.path.join(adapters, "late"))
    outside = os.path.join(work, "outside")
    shutil.copytree(os.path.join(work, "en", "adapter"), outside)
    os.symlink(outside, os.path.join(adapters, "escape"))

    server = subprocess.Popen(
        [peft, "serve", "--model", model, "--port", "0", "--api-key", KEY,
         "--adapter", "zh=" + os.path.join(work, "zh", "adapter"),
         "--adapter", "en=" + os.path.join(work, "en", "adapter"),
         "--adapter-dir", adapters, "--max-batch", "1", "--max-queue", "1"],
        stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if "listening on " not in line:
        sys.exit(f"the server did not start: {line!r}")
    base = line.strip().split("listening on ")[1]
    client = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    try:
        check(client, base, peft, model, work)
    finally:
        server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=60)
    assert code == 0, f"exit status {code} after SIGTERM"
    print("openai client: every check passed")


def peft_log_softmax(peft, model, work, adapter, ids):
    """`peft logits` on `ids` (with the adapter), log-softmaxed in f64: [position][token]."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    inputs, output = os.path.join(work, "ids.safetensors"), os.path.join(work, "logits.st")
    save_file({"input_ids": np.array([ids], dtype=np.int64)}, inputs)
    run(peft, "logits", "--model", model, "--adapter", os.path.join(work, adapter, "adapter"),
        "--inputs", inputs, "--output", output)
    logits = load_file(output)["logits"][0].astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))


def check_logprobs(client, peft, model, work):
    """`logprobs` / `top_logprobs` / `echo` in OpenAI's shapes, equal to `peft logits`."""
    # lm-evaluation-harness's log-likelihood request: the prompt scored, nothing generated.
    ids = [5, 42, 7, 300, 11, 9]
    reference = peft_log_softmax(peft, model, work, "zh", ids)
    scored = client.completions.create(model="zh", prompt=ids, max_tokens=0, echo=True,
                                       logprobs=2, temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.usage.completion_tokens == 0 and len(lp.tokens) == len(ids), lp
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, lp
    worst = max(abs(lp.token_logprobs[i] - reference[i - 1][ids[i]]) for i in range(1, len(ids)))
    assert worst <= 1e-5, f"prompt log-probabilities {worst} from peft logits"
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:]), lp.top_logprobs
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset), lp.text_offset
    assert scored.choices[0].text, "echo returns the prompt's text"

    # Generated tokens: greedy, so each one is its position's most likely; streamed, the same
    # log-probabilities arrive chunk by chunk.
    got = client.completions.create(model="zh", prompt=ids, max_tokens=5, temperature=0,
                                    logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == got.usage.completion_tokens, lp
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert abs(value - max(top.values())) <= 1e-6, (value, top)
    first = reference[-1]  # the first generated token's distribution
    assert abs(lp.token_logprobs[0] - first.max()) <= 1e-5, (lp.token_logprobs[0], first.max())
    streamed = client.completions.create(model="zh", prompt=ids, max_tokens=5, temperature=0,
                                         logprobs=3, stream=True)
    values = [v for c in streamed if c.choices and c.choices[0].logprobs
              for v in c.choices[0].logprobs.token_logprobs]
    assert values == lp.token_logprobs, (values, lp.token_logprobs)

    # Chat: `logprobs: true` with `top_logprobs: k`.
    chat = client.chat.completions.create(model="zh", messages=[{"role": "user", "content": "你好"}],
                                          max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens, content
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    e = expect_error(openai.BadRequestError,
                     lambda: client.chat.completions.create(
                         model="zh", messages=[{"role": "user", "content": "x"}], top_logprobs=2))
    assert "top_logprobs" in str(e), e
    e = expect_error(openai.BadRequestError,
                     lambda: client.completions.create(model="zh", prompt="x", logprobs=21))
    assert "logprobs" in str(e), e


def check(client, base, peft, model, work):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["model", "en", "zh"], ids

    # Completions equal `peft generate` alone, for each adapter and the base.
    prompt = "Human: 你好\n\nAssistant: "
    for name in ["zh", "en", "model"]:
        args = [peft, "generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "12",
                "--greedy", "--json"]
        if name != "model":
            args += ["--adapter", os.path.join(work, name, "adapter")]
        alone = json.loads(run(*args))["text"]
        got = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == alone, (name, got.choices[0].text, alone)
        assert got.usage.completion_tokens <= 12 and got.usage.prompt_tokens > 0
        streamed = client.completions.create(model=name, prompt=prompt, max_tokens=12,
                                             temperature=0, stream=True)
        text = "".join(c.choices[0].text for c in streamed if c.choices)
        assert text == alone, (name, text, alone)

    # Chat, whole and streamed.
    messages = [{"role": "user", "content": "你好"}]
    chat = client.chat.completions.create(model="zh", messages=messages, max_tokens=10,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant"
    whole = chat.choices[0].message.content
    stream = client.chat.completions.create(model="zh", messages=messages, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == whole, (parts, whole)
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # OpenAI's logit_bias and presence_penalty, vLLM's stop_token_ids (extra_body, as vLLM's
    # clients pass it): a +100 bias forces token 77 at once, and as a stop token id it ends the
    # answer empty with finish_reason "stop".
    forced = client.completions.create(model="zh", prompt="x", max_tokens=3, temperature=0,
                                       logit_bias={"77": 100}, presence_penalty=0.5)
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 3
    stopped = client.completions.create(model="zh", prompt="x", max_tokens=3, temperature=0,
                                        logit_bias={"77": 100},
                                        extra_body={"stop_token_ids": [77]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == "", stopped
    e = expect_error(openai.BadRequestError,
                     lambda: client.completions.create(model="zh", prompt="x", max_tokens=2,
                                                       frequency_penalty=3))
    assert "frequency_penalty" in str(e), e

    check_logprobs(client, peft, model, work)

    # Errors, as the client's exception classes.
    expect_error(openai.NotFoundError,
                 lambda: client.completions.create(model="nope", prompt="x", max_tokens=2))
    e = expect_error(openai.BadRequestError,
                     lambda: client.completions.create(model="zh", prompt="x", max_tokens=5000))
    assert "context" in str(e), e
    expect_error(openai.BadRequestError,
                 lambda: client.completions.create(model="zh", prompt="x", top_p=0))
    expect_error(openai.BadRequestError,
                 lambda: client.chat.completions.create(model="zh", messages=[]))
    wrong = OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    expect_error(openai.AuthenticationError, lambda: wrong.models.list())

    # Runtime loading, inside --adapter-dir only.
    load = lambda name, path: client.post("/load_lora_adapter", cast_to=str,
                                          body={"lora_name": name, "lora_path": path})
    expect_error(openai.PermissionDeniedError, lambda: load("x", "../outside"))
    expect_error(openai.PermissionDeniedError, lambda: load("x", "escape"))
    expect_error(openai.NotFoundError, lambda: load("x", "missing"))
    load("late", "late")
    assert "late" in [m.id for m in client.models.list().data]
    got = client.completions.create(model="late", prompt=prompt, max_tokens=12, temperature=0)
    alone_en = client.completions.create(model="en", prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == alone_en.choices[0].text, "late is a copy of en"
    client.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "late"})
    assert "late" not in [m.id for m in client.models.list().data]
    # Still a folder under --adapter-dir: listed with ?all=true, and loaded on first use.
    on_disk = {m.id: getattr(m, "loaded", None)
               for m in client.models.list(extra_query={"all": "true"}).data}
    assert on_disk.get("late") is False and on_disk.get("en") is True, on_disk
    again = client.completions.create(model="late", prompt=prompt, max_tokens=12, temperature=0)
    assert again.choices[0].text == alone_en.choices[0].text, "loaded on first use"
    for name in ["nope", "escape", "../outside"]:
        expect_error(openai.NotFoundError,
                     lambda: client.completions.create(model=name, prompt="x", max_tokens=2))
    # n choices are rows of the batch: at most --max-batch (1 here).
    e = expect_error(openai.BadRequestError,
                     lambda: client.completions.create(model="zh", prompt="x", max_tokens=2, n=2))
    assert "--max-batch" in str(e), e

    # The bounded queue: one running (batch of 1), one waiting (queue of 1), the next is 429.
    def long_request():
        try:
            s = client.completions.create(model="zh", prompt="x", max_tokens=1900,
                                          temperature=1.0, seed=5, stream=True,
                                          extra_body={"ignore_eos": True})
            for _ in s:
                pass
        except openai.APIError:
            pass

    threads = [threading.Thread(target=long_request, daemon=True)]
    threads[0].start()
    wait_for("the long request to run", lambda: metric(base, "peft_batch_size") == 1)
    threads.append(threading.Thread(target=long_request, daemon=True))
    threads[1].start()
    wait_for("the queue to fill", lambda: metric(base, "peft_queue_length") == 1)
    e = expect_error(openai.RateLimitError,
                     lambda: client.completions.create(model="zh", prompt="x", max_tokens=2))
    assert e.response.headers.get("retry-after") == "1", e.response.headers
    for t in threads:
        t.join(timeout=120)


if __name__ == "__main__":
    main()
