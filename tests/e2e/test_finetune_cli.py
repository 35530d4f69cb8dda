"""Fine-tuning a causal LM as a user does it: `danlu train sft.yaml` on conversations, then the run served
by `danlu serve RUN` and answered through the official openai client (streaming), `danlu chat RUN`,
`danlu evaluate RUN` and `danlu predict RUN` (answers as JSONL), torchrun matching one process,
exact resume after SIGKILL, and the packaged run serving."""

import pytest
import torch
from safetensors.torch import load_file

import danlu
from tests.chat_models import tiny_llama
from tests.conftest import run_cli, train_and_kill, write_config
from tests.e2e.test_serve_process import Server
from tests.integration.test_causal_lm import question, write_conversations


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    base = tiny_llama(folder / "tiny")
    data = write_conversations(folder / "chats.jsonl")
    config = write_config(
        folder / "sft.yaml", f"data: {{train: {data}}}\nmodel: {{pretrained: {base}}}\ntrain: {{epochs: 2}}\n"
    )
    out = folder / "run"
    sample = run_cli("train", str(config), "--out", str(out), "--show-sample")
    assert sample.returncode == 0 and "[[" in sample.stdout and not out.exists(), sample.stderr
    done = run_cli("train", str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "perplexity=" in done.stdout and "training" in done.stdout
    assert "of 155,200 parameters" in done.stderr  # the trainable share, said once
    assert "a conversation as trained" in done.stderr and "[[" in done.stderr  # and one sample
    return out


def test_danlu_serve_run_answers_the_openai_client_streaming(run):
    from openai import OpenAI

    server = Server(run, "--max-tokens", "16")
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [run.name]
        hello = [{"role": "user", "content": question(3)}]
        whole = client.chat.completions.create(model=run.name, messages=hello, max_tokens=12, temperature=0)
        chunks = list(
            client.chat.completions.create(
                model=run.name, messages=hello, max_tokens=12, temperature=0, stream=True
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert whole.usage.completion_tokens > 0
    finally:
        server.stop()


def test_danlu_chat_evaluate_and_predict_on_the_run(run, tmp_path):
    import json

    options = ("--prompt", question(3), "--temperature", "0", "--max-tokens", "8")
    answered = run_cli("chat", str(run), *options)
    assert answered.returncode == 0, answered.stderr
    same = run_cli("chat", str(run / "hf"), *options)  # RUN/hf is the model RUN stands for
    assert same.stdout == answered.stdout
    evaluated = run_cli("evaluate", str(run), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    assert metrics["perplexity"] > 1 and metrics["base_loss"] > 0 and metrics["samples"] > 0
    assert (run / "samples.jsonl").is_file()
    out = tmp_path / "answers.jsonl"
    predicted = run_cli("predict", str(run), str(run / "heldout.jsonl"), "-o", str(out))
    assert predicted.returncode == 0 and f"wrote {metrics['conversations']} predictions" in predicted.stdout
    assert all("answer" in json.loads(line) for line in out.read_text().splitlines())
    refused = run_cli("predict", str(run), str(run / "heldout.jsonl"), "-o", str(tmp_path / "out.csv"))
    assert refused.returncode == 2 and "must end in .jsonl" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.csv").exists()


@pytest.mark.slow
def test_torchrun_ranks_reach_the_weights_of_one_process(tmp_path):
    """2 ranks under torchrun with the same global batch of conversations give one process's adapter
    (fp32, no dropout): each rank's loss is scaled by its share of the global batch's trained tokens.
    (Ray Train runs the same ranks: tests/e2e/test_distributed.py and test_sharded.py train on it.)"""
    base = tiny_llama(tmp_path / "tiny")
    data = write_conversations(tmp_path / "chats.jsonl")
    text = (
        f"data: {{train: {data}}}\nmodel: {{pretrained: {base}, lora_dropout: 0}}\n"
        "train: {epochs: 2, precision: fp32}\n"
    )
    config = write_config(tmp_path / "sft.yaml", text)
    danlu.train(config, out=tmp_path / "one", progress=False)  # in this process: no imports to wait for
    done = run_cli("-q", "train", str(config), "--out", str(tmp_path / "two"), "--nproc", "2", timeout=600)
    assert done.returncode == 0, done.stderr
    assert torch.allclose(adapter(tmp_path / "one"), adapter(tmp_path / "two"), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    """LoRA's dropout on: the RNG state in the (adapter-only) checkpoint must make the rest exact."""
    base = tiny_llama(tmp_path / "tiny")
    data = write_conversations(tmp_path / "chats.jsonl", 240)
    text = f"data: {{train: {data}}}\nmodel: {{pretrained: {base}}}\ntrain: {{epochs: 6, precision: fp32}}\n"
    config = write_config(tmp_path / "sft.yaml", text)
    danlu.train(config, out=tmp_path / "full", progress=False)
    train_and_kill(config, tmp_path / "killed", epochs=2)
    resumed = run_cli("-q", "train", "--resume", str(tmp_path / "killed"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.equal(adapter(tmp_path / "killed"), adapter(tmp_path / "full"))


def adapter(run) -> torch.Tensor:
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    return torch.cat([tensors[k].flatten() for k in sorted(tensors)])


def test_danlu_package_run_holds_what_the_chat_server_needs_and_serves(run, tmp_path):
    import httpx

    out = tmp_path / "pkg"
    done = run_cli("package", str(run), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "run" / "hf" / "config.json").is_file() and not (out / "run" / "adapter").exists()
    requirements = (out / "requirements.txt").read_text()
    assert all(f"\n{name}==" in requirements for name in ("transformers", "tokenizers", "jinja2"))
    server = Server(out / "run", "--max-tokens", "8")  # what the image's CMD runs
    try:
        listed = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
        assert listed["id"] == "run" and listed["executor"] == "torch"
    finally:
        server.stop()
