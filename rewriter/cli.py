"""``mmcorpus rewriter SUBCOMMAND``: seed annotation, SFT export, fine-tuning, serving, tiny test models.

Each subcommand lives in its own module exposing ``main(argv) -> int``; modules are imported only
when their subcommand runs, so a missing optional extra (``finetune``) breaks only the command that
needs it.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "seed": ("rewriter.seed", "sample captions (stratified) and annotate them with a teacher model"),
    "export-sft": ("rewriter.sft", "export the seed set as chat-format JSONL with a train/validation split"),
    "finetune": ("rewriter.finetune", "LoRA fine-tune (transformers + peft) on the exported SFT data"),
    "serve": ("rewriter.serving", "start vLLM's OpenAI-compatible server for the rewriter"),
    "make-tiny-model": ("rewriter.tiny", "build a tiny random model + tokenizer locally (tests, demos)"),
}


def usage() -> str:
    lines = ["usage: mmcorpus rewriter SUBCOMMAND [ARGS]", "", "subcommands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Typical chain: seed -> export-sft -> finetune --merge -> serve -> mmcorpus rewrite --endpoint ..."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"mmcorpus rewriter: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)
