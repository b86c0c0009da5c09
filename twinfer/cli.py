"""The `twinfer` command: serve | generate | chat | check | random-model | bench."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from argparse import SUPPRESS
from pathlib import Path
from typing import Any, NoReturn


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = _parse_args(parser, sys.argv[1:] if argv is None else argv)
        logging.basicConfig(
            level=logging.INFO
            if getattr(args, "verbose", False) or args.command == "serve"
            else logging.WARNING,
            format="%(levelname)s %(asctime)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        return args.func(args)
    except ValueError as exc:
        # User-caused problems carry their own fix; no traceback for them.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse; with `--config FILE.yaml`, the file's values become defaults the flags override."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        from twinfer.config import config_file_defaults

        sub = parser._subparsers._group_actions[0].choices[args.command]
        sub.set_defaults(**config_file_defaults(args.config, sub))
        args = parser.parse_args(argv)
    return args


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if not action.option_strings or "(default" in text or default in (None, SUPPRESS):
            return text
        if isinstance(default, bool):
            if not isinstance(action, argparse.BooleanOptionalAction):
                return text  # a plain switch: off unless given
            return f"{text} (default: {'on' if default else 'off'})"
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `HelpFormatter` for every subcommand, and a bad flag as one line (the flag,
    the value, what is allowed) plus the hint to --help, not the whole usage first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for every flag.\n")


def build_parser() -> argparse.ArgumentParser:
    from twinfer.config import EngineConfig

    parser = ArgumentParser(
        prog="twinfer", description="LLM inference for MoE models on a GPU plus a big CPU."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from twinfer.server import launch

    serve = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (vLLM flags; `--config config.yaml`)."
    )
    launch.add_cli_args(serve)
    serve.set_defaults(func=launch.main)

    gen = sub.add_parser("generate", help="Generate completions for prompts (offline, batched).")
    gen.add_argument("prompts", nargs="*", help="Prompts (default: read --prompts-file).")
    gen.add_argument("--prompts-file", type=Path, help="A file with one prompt per line.")
    gen.add_argument("--chat", action="store_true", help="Wrap each prompt in the chat template.")
    gen.add_argument("--json", action="store_true", help="Print one JSON object per prompt.")
    _add_sampling_args(gen)
    EngineConfig.add_cli_args(gen)
    gen.add_argument("-v", "--verbose", action="store_true", help="Log engine details.")
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="Chat interactively with a model (streams tokens).")
    chat.add_argument("--system", help="A system prompt.")
    _add_sampling_args(chat)
    EngineConfig.add_cli_args(chat)
    chat.add_argument("-v", "--verbose", action="store_true", help="Log engine details.")
    chat.set_defaults(func=_chat)

    from twinfer.bench import check

    chk = sub.add_parser(
        "check", help="The machine's limits (CPU, DRAM, GPU, HBM, PCIe) and a model's bounds."
    )
    check.add_cli_args(chk)
    chk.set_defaults(func=check.run)

    from twinfer.bench import random_model

    rnd = sub.add_parser("random-model", help="Write a random-weight HF checkpoint of a shape.")
    random_model.add_cli_args(rnd)
    rnd.set_defaults(func=random_model.main)

    bench = sub.add_parser("bench", help="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from twinfer.bench import cpu_decode

    dec = bench_sub.add_parser("decode", help="CPU decode tokens/s vs transformers generate.")
    cpu_decode.add_cli_args(dec)
    dec.set_defaults(func=cpu_decode.main)
    from twinfer.bench import gpu, hybrid, hybrid_prefill, latency, load, serve, throughput

    for name, module, about in (
        ("gpu", gpu, "GPU decode (batch 1, 64) and 512-token prefill tokens/s with bounds."),
        ("hybrid", hybrid, "Routed experts on the CPU engine: decode, kernel GB/s, host RAM."),
        (
            "hybrid-prefill",
            hybrid_prefill,
            "Host experts streamed to the GPU for long prompts: prefill, TTFT, ITL beside it.",
        ),
        ("load", load, "Load time and peak host RAM of the benchmark model from block FP8."),
        ("serve", serve, "Latency and throughput of an OpenAI-compatible server under load."),
        ("latency", latency, "Offline engine: latency of one batch."),
        ("throughput", throughput, "Offline engine: tokens/s over many prompts."),
    ):
        bench_parser = bench_sub.add_parser(name, help=about)
        module.add_cli_args(bench_parser)
        bench_parser.set_defaults(func=module.main)
    return parser


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sampling", "Unset values come from the model's recommended defaults (logged at start)."
    )
    model = "(default: the model's"
    group.add_argument("--max-tokens", type=int, default=256, help="Most tokens per answer.")
    group.add_argument(
        "--temperature", type=float, help=f"0 is greedy; higher is more random {model}, else 1)."
    )
    group.add_argument(
        "--top-p", type=float, help=f"Keep the smallest top set of this mass {model}, else 1)."
    )
    group.add_argument(
        "--top-k", type=int, help=f"Keep the k most likely tokens; -1 all {model}, else all)."
    )
    group.add_argument(
        "--min-p", type=float, help=f"Drop tokens below min_p x the top one's {model}, else 0)."
    )
    group.add_argument(
        "--repetition-penalty",
        type=float,
        help=f"Above 1 discourages repeating prompt and output tokens {model}, else 1).",
    )
    group.add_argument("--n", type=int, default=1, help="Answers per prompt.")
    group.add_argument("--stop", action="append", help="Stop string (repeatable; default none).")
    group.add_argument("--ignore-eos", action="store_true", help="Go on past end-of-sequence.")
    group.add_argument(
        "--sampling-seed",
        type=int,
        help="Seed of each request's own random draws (default: unseeded, differs per run).",
    )


def _sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given, validated before any model is loaded."""
    from twinfer.sampling_params import SamplingParams

    overrides = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "n": args.n,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos or None,
        "seed": args.sampling_seed,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    SamplingParams(**overrides)
    return overrides


def _sampling_params(llm: Any, overrides: dict[str, Any]):
    return dataclasses.replace(llm.get_default_sampling_params(), **overrides)


def _make_llm(args: argparse.Namespace):
    from twinfer.config import EngineConfig
    from twinfer.entrypoints.llm import LLM

    config = EngineConfig.from_cli_args(args)
    return LLM(**dataclasses.asdict(config))


def _generate(args: argparse.Namespace) -> int:
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read --prompts-file {args.prompts_file}: {exc}") from exc
        prompts.extend(line for line in lines if line.strip())
    if not prompts:
        raise ValueError("no prompts: pass them as arguments or with --prompts-file FILE.")
    overrides = _sampling_overrides(args)
    llm = _make_llm(args)
    params = _sampling_params(llm, overrides)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "outputs": [
                            {
                                "text": c.text,
                                "token_ids": c.token_ids,
                                "finish_reason": c.finish_reason,
                            }
                            for c in out.outputs
                        ],
                    },
                    ensure_ascii=False,
                )
            )
            continue
        for c in out.outputs:
            print(c.text if args.chat else prompt + c.text)
        if len(prompts) > 1:
            print("-" * 40)
    return 0


def _chat(args: argparse.Namespace) -> int:
    overrides = _sampling_overrides(args)
    llm = _make_llm(args)
    params = _sampling_params(llm, overrides)
    engine = llm.engine
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {engine.model_name}. Empty line or Ctrl-D to quit.")
    turn = 0
    while True:
        try:
            user = input("> " if interactive else "")
        except EOFError:
            break
        if not user.strip():
            break
        history.append({"role": "user", "content": user})
        rid = f"chat-{turn}"
        turn += 1
        try:
            engine.add_request(rid, engine.apply_chat_template(history), params)
        except ValueError as exc:  # e.g. the conversation outgrew max_model_len
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        printed = 0
        text = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    text = out.outputs[0].text
                    print(text[printed:], end="", flush=True)
                    printed = len(text)
        except KeyboardInterrupt:
            engine.abort_request(rid)
        print()
        history.append({"role": "assistant", "content": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
