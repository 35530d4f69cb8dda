"""`danlu export --format gguf`: a Hugging Face causal LM written as one GGUF file with its tokenizer and
chat template, verified through llama.cpp (same tokens, perplexity within the type's tolerance, greedy
agreement) before it appears; refusals leave nothing behind; the file serves under both engines."""

import json

import pytest

from danlu.errors import DanluError
from danlu.export import gguf
from danlu.serve.chat.engine import Engine
from danlu.serve.chat.model import load_chat_model
from danlu.serve.chat.sampling import SamplingParams
from tests.chat_models import CHATML, tiny_llama
from tests.conftest import run_cli

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("hf") / "tiny")


def test_the_cli_writes_a_verified_file_and_its_record(hf, tmp_path):
    out = tmp_path / "tiny.q8_0.gguf"
    done = run_cli("export", str(hf), "--format", "gguf", "--quantize", "q8_0", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stdout and "greedy agreement" in done.stdout
    record = json.loads((tmp_path / "tiny.q8_0.gguf.json").read_text())
    assert record["format"] == "gguf" and record["quantize"] == "q8_0" and record["tokenizer_matches"]
    assert record["perplexity_change"] <= 0.02 and record["bytes"] == out.stat().st_size
    assert record["architecture"] == "llama" and "Q8_0" in record["types"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tiny.q8_0.gguf",
        "tiny.q8_0.gguf.json",
    ]  # no partial
    # again over its own export: allowed (the record says it is danlu's)
    assert (
        run_cli("export", str(hf), "--format", "gguf", "--quantize", "q8_0", "-o", str(out)).returncode == 0
    )


@pytest.mark.parametrize(("quantize", "greedy_min"), [("f32", 16), ("f16", 16), ("q4_0", 0)])
def test_each_type_stays_within_its_tolerance(hf, tmp_path, quantize, greedy_min):
    result = gguf.export_gguf(hf, quantize, tmp_path / f"m.{quantize}.gguf")
    assert result["perplexity_change"] <= gguf.PPL_TOLERANCE[quantize]
    assert all(g["agree"] >= greedy_min for g in result["greedy"])  # f32, f16: the torch model's tokens
    if quantize == "f32":
        assert result["max_abs_diff"] < 0.05  # llama.cpp's f16 KV cache is the only rounding


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral_export_and_verify(tmp_path, arch):
    source = tiny_llama(tmp_path / arch, arch=arch)
    result = gguf.export_gguf(source, "f16", tmp_path / f"{arch}.gguf")
    assert result["architecture"] == {"qwen2": "qwen2", "mistral": "llama"}[arch]
    assert result["tokenizer_matches"] and result["perplexity_change"] <= 0.005
    assert all(g["agree"] == g["tokens"] for g in result["greedy"])


def test_the_exported_file_serves_with_its_template_on_both_engines(hf, tmp_path):
    path = tmp_path / "tiny.gguf"
    gguf.export_gguf(hf, "f32", path)
    answers = []
    for engine in ("llama.cpp", "torch"):
        chat = load_chat_model(str(path), engine=engine)
        assert chat.engine == engine and chat.tokenizer.chat_template == CHATML
        chat.eos_ids = set()
        prompt = chat.tokenizer("hello there")["input_ids"]
        runner = Engine(chat, max_batch=1)
        answers.append(
            [e.text for e in runner.generate(prompt, SamplingParams(max_tokens=12, temperature=0))]
        )
        runner.stop()
    assert answers[0] == answers[1]  # f32 weights: both engines greedy-decode the same text


def test_a_failed_verification_writes_nothing(hf, tmp_path, monkeypatch):
    """Q and K left in Hugging Face's rotary layout (the classic silent GGUF bug): the file would load and
    talk nonsense; the perplexity check refuses it and no file, record or partial file is left."""
    monkeypatch.setattr(gguf, "_permute", lambda weights, heads: weights)
    with pytest.raises(DanluError, match=r"perplexity .* nothing was written"):
        gguf.export_gguf(hf, "f32", tmp_path / "bad.gguf")
    assert list(tmp_path.iterdir()) == []


def test_refusals_are_one_line_and_touch_nothing(hf, tmp_path):
    foreign = tmp_path / "mine.gguf"
    foreign.write_bytes(b"not danlu's")
    done = run_cli("export", str(hf), "--format", "gguf", "-o", str(foreign))
    assert done.returncode == 2 and "was not written by `danlu export`" in done.stderr
    assert foreign.read_bytes() == b"not danlu's"

    other = tmp_path / "gptneox"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    done = run_cli("export", str(other), "--format", "gguf", "-o", str(tmp_path / "x.gguf"))
    assert done.returncode == 2 and "GPTNeoXForCausalLM" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.gguf").exists()

    done = run_cli("export", str(hf), "--format", "gguf", "--quantize", "int8")
    assert done.returncode == 2 and "gguf takes f32, f16, q8_0, q4_0" in done.stderr
    done = run_cli("export", str(tmp_path), "--format", "gguf")
    assert done.returncode == 2 and "has no config.json" in done.stderr


def test_a_run_exports_its_hf_folder_into_the_run(hf, tmp_path):
    """A run of a causal LM (its fine-tuned model in RUN/hf, as the run layout says) exports into
    RUN/export/; an unfinished one is refused."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(hf, run / "hf")
    with pytest.raises(DanluError, match="not a finished run"):
        gguf.export_gguf(run, "f16")
    (run / "config.yaml").write_text("model: {}\n")
    (run / "report.json").write_text("{}\n")
    result = gguf.export_gguf(run, "f16")
    assert result["path"] == str(run / "export" / "model.f16.gguf")
    assert (run / "export" / "model.f16.gguf").is_file() and (
        run / "export" / "model.f16.gguf.json"
    ).is_file()


def test_a_nan_verification_is_refused_too(hf, tmp_path, monkeypatch):
    """NaN logits give a NaN perplexity, which no `>` comparison catches: it must still refuse."""
    monkeypatch.setattr(gguf, "perplexity", lambda logits, ids: float("nan"))
    with pytest.raises(DanluError, match="nothing was written"):
        gguf.export_gguf(hf, "f32", tmp_path / "nan.gguf")
    assert list(tmp_path.iterdir()) == []
