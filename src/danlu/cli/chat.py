"""danlu chat: a terminal chat with a local causal LM (or one answer with --prompt), and the options
`danlu serve MODEL` shares for chat models."""

from __future__ import annotations

import re
import sys

from danlu.cli.options import number
from danlu.errors import DanluError

HELP_COMMANDS = "/system TEXT sets the system prompt, /reset clears the history, /exit quits"
# a line that is a command: a slash and a word, then a space or the end (/usr/bin/env is a question)
COMMAND = re.compile(r"^/([A-Za-z]+)(?:\s|$)")


def add_model_options(p, serving: bool = False) -> None:
    prefix = "chat models: " if serving else ""
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help=f"{prefix}weights' dtype (auto: float32 on CPU, bfloat16 or float16 on CUDA)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "nf4"],
        help=f"{prefix}quantized weights: int8 (CUDA: bitsandbytes LLM.int8; CPU: int8 weight-only) or nf4 "
        "(CUDA only, bitsandbytes)",
    )
    p.add_argument("--device", default="cpu", help=f"{prefix}cpu, cuda or cuda:N (default cpu)")
    if not serving:  # danlu serve has one --engine for runs and chat models
        p.add_argument(
            "--engine",
            choices=["auto", "torch", "llama.cpp", "vllm"],
            default="auto",
            help="auto (default): llama.cpp for a .gguf file when llama-cpp-python is installed, else torch; "
            "vllm: a model directory on vLLM (starts in about 100 s on a CPU)",
        )
    p.add_argument(
        "--max-model-len",
        type=int,
        help=f"{prefix}vllm engine: tokens per sequence (default the model's context, as memory allows)",
    )
    p.add_argument(
        "--kv-cache-gb",
        type=number,
        help=f"{prefix}vllm engine: KV cache size in GiB (CPU default: 4, or half the free memory if "
        "less; CUDA default: what vLLM's share of GPU memory leaves)",
    )
    p.add_argument(
        "--tensor-parallel", type=int, default=1, help=f"{prefix}vllm engine: GPUs to shard the model over"
    )
    p.add_argument(
        "--template",
        help=f"{prefix}chat template when the model has none (or to replace it): starchat, chatml, llama3, "
        "zephyr, or a Jinja file",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help=f"{prefix}run Python code shipped with the model"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=512,
        help=f"{prefix}the most tokens an answer may have (the default, and the cap for requests; 512)",
    )


def add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a local language model in the terminal",
        description="Chat with a local causal language model: a Hugging Face directory (config.json with a "
        "*ForCausalLM architecture, safetensors, tokenizer) or a .gguf file. Answers stream as they are "
        f"generated. In the chat: {HELP_COMMANDS}. With --prompt, answer once to stdout (for scripts). "
        "Nothing is downloaded.",
    )
    p.add_argument("model", metavar="MODEL", help="model directory or .gguf file")
    p.add_argument("--prompt", help="answer this message once and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=number, help="sampling temperature (0: greedy; default the model's)")
    p.add_argument("--seed", type=int, help="sampling seed (reproducible answers)")
    add_model_options(p)
    p.set_defaults(run=run_chat)


def run_chat(args) -> int:
    from danlu.serve.chat.session import Chat, GenerationFailed

    with Chat(
        args.model,
        system=args.system,
        temperature=args.temperature,
        seed=args.seed,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        engine=args.engine,
        template=args.template,
        trust_remote_code=args.trust_remote_code,
        vllm=vllm_options(args),
    ) as chat:
        if args.prompt is not None:
            try:
                say(chat.stream(args.prompt))
            except GenerationFailed:
                return 1  # the engine's log line says why; scripts see the exit status
            return 0
        print(f"danlu chat with {chat.name} ({HELP_COMMANDS})", file=sys.stderr)
        while True:
            line = read_line()
            if line is None or line.strip() in ("/exit", "/quit"):
                return 0
            command = COMMAND.match(line)
            if command and command.group(1) == "reset":
                chat.reset()
                print("(history cleared)", file=sys.stderr)
            elif command and command.group(1) == "system":
                chat.system = line.removeprefix("/system").strip() or None
                print(f"(system prompt {'set' if chat.system else 'cleared'})", file=sys.stderr)
            elif command:  # a mistyped command is not a question for the model
                print(f"danlu: unknown command /{command.group(1)}: {HELP_COMMANDS}", file=sys.stderr)
            elif line.strip():
                try:
                    say(chat.stream(line))
                except DanluError as exc:  # the conversation outgrew the context: say so and go on
                    print(f"danlu: {exc}; /reset starts again", file=sys.stderr)
                except GenerationFailed:
                    pass  # the turn is dropped: the next one is asked without it


def say(pieces) -> None:
    """An answer to stdout as it is generated, and its line end (after a failed answer's part too)."""
    from danlu.serve.chat.session import GenerationFailed

    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except GenerationFailed:
        sys.stdout.write("\n")
        raise
    sys.stdout.write("\n")


def read_line() -> str | None:
    """The next line typed; None at the end of input. The prompt goes to stderr when stdin is not a
    terminal, so a script reading stdout gets the answers alone, one per line."""
    if sys.stdin.isatty():
        try:
            return input("> ")
        except EOFError:
            return None
    sys.stderr.write("> ")
    sys.stderr.flush()
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def vllm_options(args):
    from danlu.serve.chat.model import VllmOptions

    return VllmOptions(args.max_model_len, args.kv_cache_gb, args.tensor_parallel)
