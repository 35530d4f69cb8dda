"""danlu chat: a terminal chat with a local causal LM (or one answer with --prompt), and the options
`danlu serve MODEL` shares for chat models."""

from __future__ import annotations

import sys

from danlu.errors import DanluError

HELP_COMMANDS = "/system TEXT sets the system prompt, /reset clears the history, /exit quits"


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
        type=float,
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
    p.add_argument("--temperature", type=float, help="sampling temperature (0: greedy; default the model's)")
    p.add_argument("--seed", type=int, help="sampling seed (reproducible answers)")
    add_model_options(p)
    p.set_defaults(run=run_chat)


def run_chat(args) -> int:
    from danlu.serve.chat.model import check_path, load_chat_model, served_model
    from danlu.serve.settings import MAX_TEMPERATURE

    model = served_model(args.model)  # a fine-tuned causal LM's run: the model it holds
    check_path(model)  # a missing path or a hub id: one line before torch is imported
    if args.max_tokens < 1:
        raise DanluError("--max-tokens must be at least 1", "e.g. --max-tokens 256")
    if args.temperature is not None and not 0 <= args.temperature <= MAX_TEMPERATURE:  # the server's
        raise DanluError(
            f"--temperature must be between 0 and {MAX_TEMPERATURE:g}", "0 is greedy; e.g. --temperature 0.7"
        )
    vllm = vllm_options(args)  # its values are refused here, before torch
    from danlu.serve.chat.engine import engine_for
    from danlu.serve.chat.sampling import SamplingParams
    from danlu.serve.chat.templates import Template

    options = (args.dtype, args.device, args.trust_remote_code, args.quantize, args.engine)
    chat = load_chat_model(model, *options, vllm=vllm)
    template = Template(chat.tokenizer, args.template)
    engine = engine_for(chat, max_batch=1, extra_stops=template.stops)  # generate() steps it on this thread
    defaults = {
        k: v for k, v in chat.defaults.items() if k in ("temperature", "top_p", "top_k", "repetition_penalty")
    }
    if args.temperature is not None:
        defaults["temperature"] = args.temperature

    def answer(messages: list[dict]) -> str:
        """Stream one answer to stdout. Raises DanluError when the conversation cannot fit the context,
        GenerationFailed when the engine failed it (the engine has logged the cause)."""
        prompt = template.encode_messages(messages)
        engine.check_fits(len(prompt), args.max_tokens)
        params = SamplingParams(max_tokens=args.max_tokens, seed=args.seed, **defaults)
        parts, error = [], None
        for event in engine.generate(prompt, params):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            parts.append(event.text)
            error = event.error or error
        sys.stdout.write("\n")
        if error is not None:
            raise GenerationFailed(error)
        return "".join(parts)

    system = [{"role": "system", "content": args.system}] if args.system else []
    try:
        if args.prompt is not None:
            try:
                answer([*system, {"role": "user", "content": args.prompt}])
            except GenerationFailed:
                return 1  # the engine's log line says why; scripts see the exit status
            return 0
        print(f"danlu chat with {chat.name} ({HELP_COMMANDS})", file=sys.stderr)
        history: list[dict] = []
        while True:
            line = read_line()
            if line is None:
                return 0
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                history = []
                continue
            if line.startswith("/system"):
                text = line.removeprefix("/system").strip()
                system = [{"role": "system", "content": text}] if text else []
                continue
            if not line.strip():
                continue
            turn = {"role": "user", "content": line}
            try:
                reply = answer([*system, *history, turn])
            except DanluError as exc:  # the conversation outgrew the context: say so and go on
                print(f"danlu: {exc}; /reset starts again", file=sys.stderr)
                continue
            except GenerationFailed:
                continue  # the turn is dropped: the next one is asked without it
            history += [turn, {"role": "assistant", "content": reply}]
    finally:
        engine.stop()


class GenerationFailed(Exception):
    """The engine ended the answer with an error."""


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
