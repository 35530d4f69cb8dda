"""Fine-tuning a causal LM end to end in-process, on a tiny random Llama with a real byte-level BPE
tokenizer and conversations written here: LoRA and full fine-tuning, the run directory (the merged model,
the adapter, the template), base + adapter equal to the merged model, the prompts the server renders equal
to what training saw, gradient checkpointing that still trains the adapter, a model that learns to answer
and stop (and answers the same from its GGUF export on llama.cpp), and the errors users meet."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import danlu
from danlu.errors import DanluError
from danlu.families.causal_lm.tokens import IGNORE, encode
from danlu.serve.chat.engine import Engine
from danlu.serve.chat.model import load_chat_model, served_model
from danlu.serve.chat.sampling import SamplingParams
from danlu.serve.chat.templates import Template
from tests.chat_models import tiny_llama
from tests.conftest import interrupted_at_epoch
from tests.texts import tiny_encoder

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def question(i: int) -> str:
    return f"what comes after {WORDS[i % 10]}"


def answer(i: int) -> str:
    return WORDS[(i + 1) % 10]


def write_conversations(path, n: int = 120):
    rows = [
        {"messages": [{"role": "user", "content": question(i)}, {"role": "assistant", "content": answer(i)}]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit(out, data, model, *overrides):
    args = [f"data.train={data}", f"model.pretrained={model}", *overrides]
    return danlu.train(None, args, out=out, progress=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("chats") / "chats.jsonl")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data, base):
    return fit(tmp_path_factory.mktemp("lora") / "run", data, base, "train.epochs=3")


def test_a_lora_run_learns_and_holds_its_model_adapter_and_template(lora_run):
    report = lora_run.report
    assert report["family"] == "causal_lm" and report["task"] == "generation"
    assert lora_run.config.data.family == "causal_lm" and lora_run.config.model.adapter == "lora"
    losses = [m["val_loss"] for m in lora_run.metrics]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    stats = report["causal_lm"]
    assert stats["conversations"] == report["rows"]["train"] and stats["trained_tokens_per_epoch"] > 0
    assert report["test"]["tokens"] > 0 and report["test"]["perplexity"] > 1
    path = lora_run.path
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in (path / "hf").iterdir()
    }
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        p.name for p in (path / "adapter").iterdir()
    }
    assert (path / "model.safetensors").samefile(path / "hf" / "model.safetensors")
    stored = [json.loads(line) for line in (path / "heldout.jsonl").read_text().splitlines()]
    assert len(stored) == report["rows"]["test"] and stored[0]["messages"][-1]["role"] == "assistant"


def test_the_merged_model_equals_the_base_with_the_adapter(lora_run, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 7]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(lora_run.path / "hf").eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base).eval()
        before = plain(ids).logits
        adapted = PeftModel.from_pretrained(plain, lora_run.path / "adapter").eval()(ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert not torch.allclose(merged, before, atol=1e-3)  # the adapter moved


def test_the_server_renders_the_prompts_training_saw(lora_run):
    """The run's chat model renders, for every prefix of a conversation, the very ids training used."""
    from danlu.families import state_from_json

    chat = load_chat_model(served_model(str(lora_run.path)))
    assert chat.name == lora_run.path.name
    served = Template(chat.tokenizer)  # RUN/hf's own template: what `danlu serve RUN` renders with
    _, state = state_from_json((lora_run.path / "preprocess.json").read_text(), lora_run.path)
    trained = Template.of_source(chat.tokenizer, state.template, state.template_name)
    messages = [
        {"role": "system", "content": "Count."},
        {"role": "user", "content": question(1)},
        {"role": "assistant", "content": answer(1)},
        {"role": "user", "content": question(2)},
        {"role": "assistant", "content": answer(2)},
    ]
    encoded = encode(trained, messages, "assistant", state.end_ids)
    for turn in (2, 4):
        prompt = served.encode_messages(messages[:turn])
        assert encoded.input_ids[: len(prompt)] == prompt
        assert encoded.labels[len(prompt)] != IGNORE and encoded.labels[len(prompt) - 1] == IGNORE
    assert set(state.end_ids) <= chat.eos_ids  # the server stops where training taught the model to
    with pytest.raises(DanluError, match=r"answers conversations, not rows.*danlu chat RUN"):
        danlu.load(lora_run.path)  # the row-by-row Predictor


def test_gradient_checkpointing_still_trains_the_adapter(tmp_path, data, base):
    run = fit(tmp_path / "run", data, base, "train.epochs=1", "train.gradient_checkpointing=true")
    adapter = load_file(run.path / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # LoRA's B starts at zero: it moved


def test_a_full_fine_tune_learns_to_answer_and_to_stop(tmp_path, base):
    data = write_conversations(tmp_path / "chats.jsonl", 200)
    overrides = ("model.adapter=none", "train.lr=3e-3", "train.epochs=12", "train.batch_size=16")
    run = fit(tmp_path / "run", data, base, *overrides, "data.val_fraction=0")
    assert not (run.path / "adapter").exists()
    answers = answers_of(load_chat_model(served_model(str(run.path))))
    assert sum(a == (answer(i), "stop") for i, a in enumerate(answers)) >= 9, answers
    # danlu evaluate: the held-out questions answered and scored, the loss before and after
    metrics = danlu.evaluate(run.path)
    assert metrics["conversations"] == run.report["rows"]["test"] == 40 and metrics["samples"] == 32
    assert metrics["loss"] == pytest.approx(run.report["test"]["loss"], rel=1e-3)
    assert metrics["base_loss"] > 2 * metrics["loss"] and metrics["exact_match"] >= 0.9
    samples = [json.loads(line) for line in (run.path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == metrics["samples"] and samples[0]["messages"][-1]["role"] == "user"
    assert sum(s["answer"] == s["reference"] for s in samples) == round(metrics["exact_match"] * len(samples))
    # danlu predict: prompts in every shape (a reference answer is dropped and answered afresh)
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": question(2)},
        {"instruction": question(5)},
        {"messages": [{"role": "user", "content": question(7)}, {"role": "assistant", "content": "?"}]},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert danlu.predict_file(run.path, prompts, tmp_path / "answers.jsonl") == 3
    predicted = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [p["answer"] for p in predicted] == [answer(2), answer(5), answer(7)]
    assert predicted[2]["messages"] == [{"role": "user", "content": question(7)}]
    if importlib.util.find_spec("llama_cpp") is not None:
        # the verified GGUF export of the run answers the same through the llama.cpp engine
        from danlu.export.gguf import export_gguf

        result = export_gguf(run.path, "f32")
        assert result["path"] == str(run.path / "export" / "model.f32.gguf")
        assert answers_of(load_chat_model(result["path"], engine="llama.cpp")) == answers


def answers_of(chat) -> list[tuple[str, str]]:
    """(greedy text, finish reason) for each question, rendered with the model's own template."""
    template = Template(chat.tokenizer)
    engine = Engine(chat, max_batch=1)
    answers = []
    for i in range(10):
        prompt = template.encode_messages([{"role": "user", "content": question(i)}])
        events = list(engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0)))
        answers.append(("".join(e.text for e in events), events[-1].finish_reason))
    return answers


def test_errors_name_the_problem(tmp_path, data, base):
    bare = tiny_llama(tmp_path / "bare", template=False)
    with pytest.raises(DanluError, match="has no chat template"):
        fit(tmp_path / "a", data, bare)
    assert fit(tmp_path / "b", data, bare, "model.template=chatml", "train.epochs=1").report["test"]
    with pytest.raises(DanluError, match=r"data.max_length=512 is beyond the 256 positions"):
        fit(tmp_path / "c", data, base, "data.max_length=512")
    lonely = tmp_path / "lonely.jsonl"
    lonely.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DanluError, match=r"holds no conversation to train on .1 with no assistant turn"):
        fit(tmp_path / "d", lonely, base)
    long = tmp_path / "long.jsonl"
    long.write_text(data.read_text() + json.dumps({"prompt": "x " * 300, "completion": "y"}) + "\n")
    with pytest.raises(DanluError, match=r"line 121 has .* tokens, over data\.max_length=256"):
        fit(tmp_path / "e", long, base, "data.on_long=error")
    assert fit(tmp_path / "f", long, base, "train.epochs=1").report["causal_lm"]["left_out"] == {
        "longer than data.max_length": 1
    }
    with pytest.raises(DanluError, match=r"needs model\.pretrained"):
        danlu.train(None, [f"data.train={data}", "data.family=causal_lm"], out=tmp_path / "g")
    encoder = tiny_encoder(tmp_path / "bert")
    with pytest.raises(DanluError, match="is not a causal language model"):
        fit(tmp_path / "h", data, encoder, "data.family=causal_lm")
    no_system = tmp_path / "no_system.jinja"  # a template that has no system role, as some models' do
    no_system.write_text(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with_system = tmp_path / "system.jsonl"
    with_system.write_text(json.dumps({"system": "Count.", "prompt": "one", "completion": "two"}) + "\n")
    with pytest.raises(DanluError, match="the chat template failed: System role not supported"):
        fit(tmp_path / "i", with_system, base, f"model.template={no_system}")
    assert not (tmp_path / "i").exists()  # a failed set-up leaves nothing


def test_an_alpaca_json_array_is_conversations_named_by_item(tmp_path, base):
    """alpaca_data.json's shape (one JSON array of instruction/input/output objects) is picked for a causal
    LM as JSON Lines is, trains, and its items are named in errors and in --show-sample."""
    rows = [{"instruction": question(i), "input": "", "output": answer(i)} for i in range(40)]
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(rows, indent=2))
    run = fit(tmp_path / "run", alpaca, base, "train.epochs=1")
    assert run.config.data.family == "causal_lm" and run.report["causal_lm"]["conversations"] > 0
    sample = danlu.show_sample({"data": {"train": str(alpaca)}, "model": {"pretrained": str(base)}})
    assert sample.startswith(f"{alpaca} item 1, chat template")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": question(i)} for i in range(2)]))
    assert danlu.predict_file(run.path, prompts, tmp_path / "answers.jsonl") == 2
    long = tmp_path / "long.json"
    long.write_text(json.dumps([*rows, {"instruction": "x " * 300, "output": "y"}]))
    with pytest.raises(DanluError, match=r"long.json: the conversation at item 41 has .* tokens"):
        fit(tmp_path / "e", long, base, "data.on_long=error")


def counting(start: int, n: int) -> str:
    return " ".join(WORDS[(start + k) % 10] for k in range(n))


def test_plain_texts_train_every_token_in_pieces_and_are_continued_as_trained(tmp_path, base):
    """Continued pre-training: {"text"} rows train every token with no chat template; a text longer than
    data.max_length is cut into pieces that stay in one split; evaluate gives the loss alone and predict
    continues texts as /v1/completions does."""
    from transformers import AutoTokenizer

    from danlu.families.causal_lm.data import Encoded
    from danlu.families.causal_lm.tokens import encode_texts

    texts = [counting(i, 3 + i % 8) for i in range(150)] + [counting(0, 150)]  # the last: over 64 tokens
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    config = {"data": {"train": str(path), "max_length": 64}, "model": {"pretrained": str(base)}}
    header, shown = danlu.show_sample(config).split("\n", 1)
    assert "plain text, no chat template, every token trained (1 piece" in header
    assert shown == "one[[ two three<|im_end|>]]"  # the model's end token closes each text, trained

    tokenizer = AutoTokenizer.from_pretrained(base)
    counts = [len(p) for p in encode_texts(tokenizer, texts, 64)]
    assert counts[-1] > 2 and set(counts[:-1]) == {1}
    pieces = dict(zip(texts, counts, strict=True))
    overrides = ("model.adapter=none", "train.lr=3e-3", "train.epochs=8", "train.batch_size=16")
    run = fit(tmp_path / "run", path, base, *overrides, "data.max_length=64", "data.val_fraction=0")
    stats, rows = run.report["causal_lm"], run.report["rows"]
    held = [json.loads(line)["text"] for line in (run.path / "heldout.jsonl").read_text().splitlines()]
    assert "conversations" not in stats and stats["texts"] + len(held) == len(texts)
    assert rows["test"] == sum(pieces[t] for t in held)  # a text's pieces are in one split
    assert rows["train"] + rows["test"] == sum(counts)
    # the split draws texts, and a part takes each text's every piece: text 1 is rows 1-3 here
    encoded = Encoded.of(
        [np.arange(2 + k) for k in range(5)], [np.arange(2 + k) for k in range(5)], [0, 1, 2], {}
    )
    encoded.pieces = np.array([0, 1, 4, 5])
    part = encoded.part(np.array([1]), 0, torch.device("cpu"))
    assert (part.n_rows, part.conversations, part.texts) == (3, 1, True)
    assert part.lengths.tolist() == [3, 4, 5]
    assert stats["trained_tokens_per_epoch"] == stats["tokens_per_epoch"] - rows["train"]  # all but the first

    metrics = danlu.evaluate(run.path)
    assert metrics["texts"] == len(held) and "samples" not in metrics
    assert metrics["loss"] == pytest.approx(run.report["test"]["loss"], rel=1e-3)
    assert metrics["base_loss"] > 2 * metrics["loss"]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": counting(i, 3)}) + "\n" for i in (2, 6)))
    assert danlu.predict_file(run.path, prompts, tmp_path / "more.jsonl") == 2
    more = [json.loads(line) for line in (tmp_path / "more.jsonl").read_text().splitlines()]
    assert [m["text"] for m in more] == [counting(2, 3), counting(6, 3)]
    assert [m["answer"].split()[:2] for m in more] == [[WORDS[5], WORDS[6]], [WORDS[9], WORDS[0]]]


def test_conversations_in_parquet_shards_fine_tune(tmp_path, data, base):
    import pandas as pd

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    folder = tmp_path / "chats"
    folder.mkdir()
    pd.DataFrame(rows[:60]).to_parquet(folder / "train-00000-of-00002.parquet")
    pd.DataFrame(rows[60:]).to_parquet(folder / "train-00001-of-00002.parquet")
    run = fit(tmp_path / "run", folder, base, "train.epochs=1")
    assert run.config.data.family == "causal_lm" and sum(run.report["rows"].values()) == len(rows)
    assert danlu.evaluate(run.path)["conversations"] == run.report["rows"]["test"]


def test_batches_are_drawn_at_random_unless_grouped_by_length(tmp_path, base):
    """Conversations train in random batches by default; data.group_by_length: true pads less."""
    varied = tmp_path / "varied.jsonl"
    rows = [{"prompt": " ".join(WORDS[: 1 + i % 10]) * (1 + i % 7), "completion": "ok"} for i in range(160)]
    varied.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shares = {}
    for grouped in ("false", "true"):
        run = fit(tmp_path / grouped, varied, base, "train.epochs=1", f"data.group_by_length={grouped}")
        shares[grouped] = run.report["causal_lm"]["padding_share"]
    default = fit(tmp_path / "default", varied, base, "train.epochs=1").report["causal_lm"]["padding_share"]
    assert default == shares["false"] and shares["true"] < 0.5 * shares["false"]


def test_a_gguf_file_fine_tunes_into_a_model_directory(tmp_path, data):
    from tests.chat_models import tiny_gguf

    gguf = tiny_gguf(tmp_path / "gguf")
    run = fit(tmp_path / "run", data, gguf, "train.epochs=1")
    assert run.config.data.family == "causal_lm" and run.report["test"]["loss"] > 0
    chat = load_chat_model(served_model(str(run.path)))
    assert chat.engine == "torch" and (run.path / "hf" / "config.json").is_file()


def adapter_weights(run) -> torch.Tensor:
    tensors = load_file(run.path / "adapter" / "adapter_model.safetensors")
    return torch.cat([tensors[k].flatten() for k in sorted(tensors)])


def test_resume_after_a_stop_gives_identical_weights(tmp_path, data, base, monkeypatch):
    from danlu.training import checkpoint as ckpt

    settings = ("train.epochs=3", "train.precision=fp32")  # LoRA's dropout is on: the RNG state matters
    full = fit(tmp_path / "full", data, base, *settings)
    interrupted_at_epoch(monkeypatch, 2, lambda: fit(tmp_path / "stopped", data, base, *settings))
    # the checkpoint holds the adapter alone: the frozen base is read again from model.pretrained
    saved = ckpt.load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")[ckpt.MODEL_KEY]
    assert saved and all("lora_" in name for name in saved)
    resumed = danlu.train(resume=tmp_path / "stopped", progress=False)
    assert torch.equal(adapter_weights(resumed), adapter_weights(full))
    assert [m["epoch"] for m in resumed.metrics] == [1, 2, 3]


def test_resume_refuses_a_base_model_that_changed(tmp_path, data, monkeypatch):
    from safetensors.torch import save_file

    base = tiny_llama(tmp_path / "tiny")
    interrupted_at_epoch(monkeypatch, 2, lambda: fit(tmp_path / "stopped", data, base, "train.epochs=3"))
    weights = load_file(base / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 1.01
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DanluError, match="have changed since the run started"):
        danlu.train(resume=tmp_path / "stopped", progress=False)


def test_show_sample_marks_the_trained_tokens_of_the_first_conversation(data, base, tmp_path):
    shown = danlu.show_sample({"data": {"train": str(data)}, "model": {"pretrained": str(base)}})
    header, text = shown.split("\n", 1)
    assert "line 1" in header and "chat template 'model'" in header and "train.loss_on=assistant" in header
    assert text == (
        f"<|im_start|>user\n{question(0)}<|im_end|>\n<|im_start|>assistant\n[[{answer(0)}<|im_end|>]]\n"
    )
    assert not (tmp_path / "runs").exists()  # nothing written
    with pytest.raises(DanluError, match="this is a tabular run"):
        danlu.show_sample({"data": {"train": "synthetic:classification"}})


def test_a_packed_row_gives_each_conversation_the_loss_it_gets_alone(base, tmp_path):
    """Three conversations of different lengths in one packed row: the summed loss and the trained
    tokens equal theirs alone (positions restart and attention stays inside each conversation)."""
    from danlu.config import DataConfig, ModelConfig, TrainConfig
    from danlu.families.causal_lm.data import encode_all
    from danlu.families.causal_lm.models import CausalLMModel, load_pretrained
    from danlu.families.causal_lm.pretrained import new_state
    from danlu.training.objectives import trained_tokens

    data = write_conversations(tmp_path / "c.jsonl", 3)
    state = new_state(DataConfig(train=str(data)), ModelConfig(pretrained=str(base)), TrainConfig())
    template = Template(state._tokenizer)
    conversations = [
        [{"role": "user", "content": question(0)}, {"role": "assistant", "content": answer(0)}],
        [
            {"role": "user", "content": "hello there, how are you today?"},
            {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog"},
            {"role": "user", "content": question(4)},
            {"role": "assistant", "content": answer(4)},
        ],
        [
            {"role": "system", "content": "Count."},
            {"role": "user", "content": "one two"},
            {"role": "assistant", "content": "three"},
        ],
    ]
    encoded = encode_all(state, template, conversations, [1, 2, 3], "skip", "test")
    model = CausalLMModel(load_pretrained(base)).eval()
    cpu = torch.device("cpu")
    single = [b for i in range(3) for b in encoded.part(np.array([i]), 0, cpu).batches(1)]
    packed_part = encoded.part(np.arange(3), 0, cpu, pack_to=256)
    assert packed_part.n_rows == 1 and packed_part.conversations == 3
    (batch,) = list(packed_part.batches(8))
    with torch.no_grad():
        alone = [model(*b.inputs.values()) for b in single]
        packed = model(*batch.inputs.values())
    assert trained_tokens(batch.target) == sum(trained_tokens(b.target) for b in single)
    assert torch.allclose(packed, torch.stack(alone).sum(), rtol=1e-5)
    # and without the block mask the conversations would see each other: the loss differs
    unmasked = {**batch.inputs, "attention_mask": torch.ones_like(batch.inputs["input_ids"])}
    with torch.no_grad():
        assert not torch.allclose(model(*unmasked.values()), packed, rtol=1e-3)


def test_packing_trains_the_same_tokens_in_fewer_rows(tmp_path, data, base):
    plain = fit(tmp_path / "plain", data, base, "train.epochs=1")
    packed = fit(tmp_path / "packed", data, base, "train.epochs=1", "data.packing=true")
    stats, packed_stats = plain.report["causal_lm"], packed.report["causal_lm"]
    assert packed_stats["conversations"] == stats["conversations"]
    assert packed_stats["rows"] < stats["rows"] / 5  # about 25 tokens a conversation, 256 a row
    assert packed_stats["trained_tokens_per_epoch"] == stats["trained_tokens_per_epoch"]
    assert packed.report["test"]["loss"] < 10
