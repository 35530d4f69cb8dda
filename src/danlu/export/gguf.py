"""`danlu export MODEL --format gguf`: a Hugging Face causal LM as one GGUF file (weights, tokenizer, chat
template), verified through llama.cpp against the torch model before it is written.

Verification: (1) llama.cpp's own tokenizer, reading the file, must give the model tokenizer's ids for a
fixed multilingual text (else llama.cpp-based tools would see other tokens than the model was trained
on); (2) the perplexity of the GGUF on that text through llama.cpp must be within the quantization's
tolerance of the torch model's; (3) greedy continuations of a few prompts through llama.cpp and torch
are compared token by token and the agreement is recorded. The file appears only when (1) and (2) pass.

Architectures: Llama (and Mistral, which llama.cpp runs as Llama) and Qwen2, with byte-level BPE
tokenizers. Others are refused with one line, never written half right."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from danlu import __version__
from danlu.errors import DanluError
from danlu.hf import load_files, load_model, quiet_transformers

QUANTIZE = ("f32", "f16", "q8_0", "q4_0")
# the most the GGUF's perplexity may differ from the torch model's, relative
PPL_TOLERANCE = {"f32": 0.001, "f16": 0.005, "q8_0": 0.02, "q4_0": 0.08}
# a fixed text: prose, digits, code, CJK, emoji, odd whitespace: what tokenizers disagree on
TEXT = (
    "The alchemist's furnace (丹炉) heats the mixture to 1,234 degrees for 56 minutes. "
    "Then it cools, slowly.\n\n  def f(x):\n      return x ** 2  # squares\n"
    "Émile said: «très bien», and 東京 is far from Zürich 🚀. It's 3.14159, isn't it?\t\tYes!\n"
    "Continuous batching keeps every core busy while streams arrive and leave at their own pace."
)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
GREEDY_TOKENS = 16


@dataclass(frozen=True)
class Arch:
    gguf: str  # llama.cpp's architecture name
    permute_qk: bool  # llama.cpp's Llama rope wants Q and K rows interleaved per head


ARCHES = {
    "LlamaForCausalLM": Arch("llama", True),
    "MistralForCausalLM": Arch("llama", True),
    "Qwen2ForCausalLM": Arch("qwen2", False),
}
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _refuse(what: str, fix: str = "GGUF export takes Llama, Mistral and Qwen2 models with byte-level BPE "
            "tokenizers") -> DanluError:  # fmt: skip
    return DanluError(f"{what}; nothing was written", fix)


def pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for a tokenizer.json pre_tokenizer, or a refusal naming it."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        named = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(regex)
        if named:
            return named
    raise _refuse(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp "
                  "equivalent danlu knows")  # fmt: skip


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotary layout (halves) to llama.cpp's (pairs), per head."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tensor_type(name: str, array: np.ndarray, quantize: str):
    """The GGML type a tensor is stored in: norms and biases stay float32; in q4_0 the embeddings and
    the output layer are q8_0 (they cost the most accuracy per bit); rows that do not split into
    32-value blocks fall back to f16."""
    from gguf import GGMLQuantizationType as T

    if array.ndim < 2 or quantize == "f32":
        return T.F32
    if quantize == "f16":
        return T.F16
    if array.shape[-1] % 32:
        return T.F16
    if quantize == "q4_0" and name.split(".")[0] not in ("token_embd", "output"):
        return T.Q4_0
    return T.Q8_0


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # gguf.LlamaFileType


def write(model_dir: Path, path: Path, quantize: str) -> dict[str, Any]:
    """Write the GGUF file of a Hugging Face causal-LM directory; returns what it wrote (tensors, types)."""
    import gguf
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    architectures = config.get("architectures") or []
    arch = next((ARCHES[a] for a in architectures if a in ARCHES), None)
    if arch is None:
        raise _refuse(f"'{model_dir}' is a {', '.join(architectures) or 'model of no architecture'}")
    scaling = config.get("rope_scaling") or {}
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise _refuse(f"rope scaling '{scaling.get('rope_type') or scaling.get('type')}' is not written yet")
    tokenizer = load_files(AutoTokenizer, model_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        fallback = " with byte fallback" if model.get("byte_fallback") else ""
        raise _refuse(f"the tokenizer is {model.get('type')}{fallback}, not byte-level BPE")
    pre = pre_tokenizer(spec)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    layers = config["num_hidden_layers"]
    vocab = max(config["vocab_size"], len(tokenizer))

    writer = gguf.GGUFWriter(str(path), arch.gguf)
    writer.add_name(model_dir.name)
    writer.add_context_length(config.get("max_position_embeddings") or 2048)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(
        float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)
    )
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    writer.add_vocab_size(vocab)
    writer.add_file_type(FILE_TYPES[quantize])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, tokenizer, model, pre, vocab)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.upper()], layers)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise _refuse(f"'{model_dir}' has no safetensors weights", "save the model with save_pretrained")
    written: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise _refuse(f"the weight '{key}' has no GGUF name")
                array = weights.get_tensor(key).to(torch.float32).numpy()
                if arch.permute_qk and name.endswith("attn_q.weight"):
                    array = _permute(array, heads)
                elif arch.permute_qk and name.endswith("attn_k.weight"):
                    array = _permute(array, kv_heads)
                kind = _tensor_type(name, array, quantize)
                if kind == gguf.GGMLQuantizationType.F32:
                    writer.add_tensor(name, np.ascontiguousarray(array))
                elif kind == gguf.GGMLQuantizationType.F16:
                    writer.add_tensor(name, array.astype(np.float16))
                else:
                    writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
                written[name] = kind.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch.gguf, "pre_tokenizer": pre, "tensors": len(written),
            "types": sorted(set(written.values()))}  # fmt: skip


def _write_tokenizer(writer: Any, tokenizer: Any, model: dict, pre: str, vocab: int) -> None:
    import gguf

    T = gguf.TokenType
    added = {t.content: t for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()}
    tokens, types = [], []
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    for piece in pieces:
        token = added.get(piece)
        tokens.append(piece)
        types.append(T.NORMAL if token is None else T.CONTROL if token.special else T.USER_DEFINED)
    for i in range(len(tokens), vocab):  # embedding rows past the tokenizer's vocabulary
        tokens.append(f"[PAD{i}]")
        types.append(T.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token is not None:
            add(int(token))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = tokenizer.chat_template
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


# --- verification ------------------------------------------------------------------------------------


def _torch_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ids[1:] given the logits at the positions before."""
    rows = logits[:-1].astype(np.float64)
    rows = rows - rows.max(axis=1, keepdims=True)
    log_probs = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
    nll = -log_probs[np.arange(len(ids) - 1), ids[1:]]
    return float(math.exp(nll.mean()))


def _agreement(a: list[int], b: list[int]) -> int:
    same = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        same += 1
    return same


def verify(model_dir: Path, path: Path, quantize: str) -> dict[str, Any]:
    """Check a written GGUF file against the torch model; the figures, and whether they pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from danlu.serve.chat.llamacpp import LlamaCppModel

    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        tokenizer = load_files(AutoTokenizer, model_dir)
        model = load_model(AutoModelForCausalLM, model_dir, use_safetensors=True, dtype=torch.float32).eval()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    gguf_model = LlamaCppModel.load(path)
    llama_ids = gguf_model.tokenize(TEXT)
    torch_logits = _torch_logits(model, ids)
    gguf_logits = gguf_model.logits(ids)
    ppl_torch, ppl_gguf = perplexity(torch_logits, ids), perplexity(gguf_logits, ids)
    greedy = []
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            out = model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=pad
            )
        expected = out[0, len(prompt_ids) :].tolist()
        got = gguf_model.greedy(prompt_ids, len(expected))
        greedy.append({"prompt": prompt, "tokens": len(expected), "agree": _agreement(expected, got)})
    change = abs(ppl_gguf - ppl_torch) / ppl_torch
    return {
        "text_tokens": len(ids),
        "tokenizer_matches": llama_ids == ids,
        "perplexity_torch": ppl_torch,
        "perplexity_gguf": ppl_gguf,
        "perplexity_change": change,
        "perplexity_tolerance": PPL_TOLERANCE[quantize],
        "max_abs_diff": float(np.abs(torch_logits - gguf_logits).max()),
        "greedy": greedy,
    }


def source_of(model_or_run: str | Path, quantize: str) -> tuple[Path, Path]:
    """(the Hugging Face directory to read, the default output path) for a model directory or a run
    whose hf/ folder holds a causal LM."""
    from danlu.run import RunDir

    given = Path(model_or_run)
    if not given.is_dir():
        raise DanluError(
            f"'{given}' is not a directory",
            "pass a Hugging Face causal-LM directory (config.json, safetensors, tokenizer) or a run",
        )
    if (given / "hf" / "config.json").is_file():  # a run: its fine-tuned model, exported into the run
        RunDir(given).require_complete()
        return given / "hf", given / "export" / f"model.{quantize}.gguf"
    if not (given / "config.json").is_file():
        raise DanluError(
            f"'{given}' has no config.json (nor hf/config.json)",
            "pass a Hugging Face causal-LM directory, or a run of a causal LM",
        )
    return given, Path(f"{given.resolve().name}.{quantize}.gguf")


def export_gguf(
    model_dir: str | Path, quantize: str = "f16", out: str | Path | None = None
) -> dict[str, Any]:
    """Write a Hugging Face causal LM (a model directory, or a run's hf/) as a GGUF file and verify it
    through llama.cpp; the file (and PATH.json, the verification) appear only when it passes. The
    default path is RUN/export/model.TYPE.gguf for a run, ./NAME.TYPE.gguf for a model directory.

    Raises:
        DanluError: an unsupported model, no llama.cpp, or a failed verification (with the figures).
    """
    from danlu.run import atomic_write_json, check_export_target, export_record_path
    from danlu.serve.chat import llamacpp

    if quantize not in QUANTIZE:
        raise DanluError(f"unknown GGUF quantization '{quantize}'", f"use --quantize {' | '.join(QUANTIZE)}")
    source, default = source_of(model_dir, quantize)
    if not llamacpp.available():
        raise DanluError("GGUF export verifies the file through llama.cpp, which is not installed",
                         llamacpp.INSTALL)  # fmt: skip
    path = Path(out) if out is not None else default
    check_export_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    started = time.perf_counter()
    try:
        wrote = write(source, partial, quantize)
        check = verify(source, partial, quantize)
        result = {
            "path": str(path),
            "format": "gguf",
            "quantize": quantize,
            "bytes": partial.stat().st_size,
            "danlu_version": __version__,
            "source": str(source),
            "metric": "perplexity",
            **wrote,
            **check,
            "seconds": round(time.perf_counter() - started, 2),
        }
        if not check["tokenizer_matches"]:
            raise DanluError(
                "llama.cpp's tokenizer reading the GGUF file splits the check text differently from the "
                f"model's tokenizer (pre-tokenizer '{wrote['pre_tokenizer']}'); nothing was written",
                "report this with the model's tokenizer.json",
            )
        if (
            not math.isfinite(check["max_abs_diff"])
            or not check["perplexity_change"] <= PPL_TOLERANCE[quantize]
        ):
            # a NaN compares false with any tolerance: it must fail, never pass
            raise DanluError(
                f"the {quantize} GGUF's perplexity is {check['perplexity_gguf']:.4g} against the torch "
                f"model's {check['perplexity_torch']:.4g} ({check['perplexity_change']:.2%}, over "
                f"{PPL_TOLERANCE[quantize]:.1%}); nothing was written",
                "use a wider type (--quantize q8_0 or f16)",
            )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    atomic_write_json(export_record_path(path), result)
    return result
