"""LoRA (or full) fine-tuning of the rewriter on exported SFT data (transformers + peft), on a GPU or the CPU.

``mmcorpus rewriter finetune --base MODEL_DIR --data build/sft --output build/rewriter-lora [--merge | --full]``

A plain PyTorch loop over the chat examples of ``export-sft``: each example is rendered with the
base model's chat template; the loss covers the assistant turn only (prompt tokens are masked with
-100), so the model learns to answer with the JSON object and end its turn. AdamW, linear warm-up
and decay, gradient accumulation, bf16 autocast on CUDA, fixed seeds (same data + config = same
adapter on the same hardware). The output directory holds ``adapter/`` (a peft adapter vLLM can serve
with ``--lora-modules``), with ``--merge`` also ``merged/`` (the adapter folded into a full model,
tokenizer beside it), and ``finetune.json`` (config, losses, validation loss before and after).
``--full`` (``method="full"``) trains every weight instead and writes the whole model to ``merged/``
(no adapter): for the tiny test models, whose frozen ``lm_head`` and 64-wide layers leave a LoRA adapter
too little capacity to condition its answer on the prompt's language (``rewriter.tiny``).

transformers, peft and torch are the optional ``finetune`` extra; they are imported only here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from schemas.errors import UserError

log = logging.getLogger("mmcorpus.rewriter.finetune")

INSTALL_HINT = "pip install torch && pip install -e '.[finetune]'  (CPU-only here: pip install torch==2.13.0 first)"
ADAPTER_DIRNAME = "adapter"
MERGED_DIRNAME = "merged"
REPORT_NAME = "finetune.json"
IGNORE_INDEX = -100
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    """LoRA and optimisation settings.

    Args:
        method: ``lora`` (an adapter over frozen weights) or ``full`` (every weight is trained; the
            output is a full model in ``merged/``; LoRA settings are then ignored).
        lora_r, lora_alpha, lora_dropout: LoRA rank, scaling and dropout (serve with ``--max-lora-rank >= lora_r``).
        target_modules: module names the adapter wraps (Llama/Qwen/Mistral projection names by default).
        learning_rate, weight_decay, warmup_ratio: AdamW with linear warm-up and decay.
        max_steps: optimiser steps; None means ``epochs`` passes over the training data.
        epochs: passes over the data when ``max_steps`` is None.
        batch_size, grad_accum: examples per forward pass and passes per optimiser step.
        max_seq_len: longer examples are cut (their assistant turn loses its end: avoid by sizing).
        seed: seeds Python and torch (data order, LoRA init, dropout).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        cpu_threads: torch intra-op threads on the CPU (None: torch's default). On a shared,
            oversubscribed machine 1 thread is many times faster than spinning OpenMP threads.

    Example:
        >>> FinetuneConfig(lora_r=8, max_steps=100).lora_alpha
        16
    """

    method: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_steps: int | None = None
    epochs: float = 3.0
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 1024
    seed: int = 0
    device: str = "auto"
    cpu_threads: int | None = None

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise ValueError("method must be lora or full")
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ValueError("lora_r and lora_alpha must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_dropout must be in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1 (or None to use epochs)")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("epochs must be > 0 when max_steps is None")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("device must be auto, cpu or cuda")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError("cpu_threads must be >= 1 (or None)")
        if not self.target_modules:
            raise ValueError("target_modules must not be empty")


def require_finetune_extra():
    """Import torch, transformers and peft, or fail with the install command."""
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        raise UserError(f"rewriter finetune needs the finetune extra ({e.name} is missing): {INSTALL_HINT}") from e
    return torch, transformers, peft


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass
class FinetuneResult:
    adapter_dir: str | None  # None for a full fine-tune
    merged_dir: str | None
    steps: int
    losses: list[float] = field(default_factory=list)
    val_loss_before: float | None = None
    val_loss_after: float | None = None
    seconds: float = 0.0


def encode_example(tokenizer, messages: list[dict[str, str]], max_seq_len: int) -> Encoded:
    """Token ids of the whole conversation; labels only on the final assistant turn."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("an SFT example must end with an assistant message")
    prompt_ids = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
    full_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    prompt_ids = _as_ids(prompt_ids)
    full_ids = _as_ids(full_ids)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently inside the full conversation")
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return Encoded(full_ids[:max_seq_len], labels[:max_seq_len])


def _as_ids(value) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    if hasattr(value, "keys") and "input_ids" in value:
        value = value["input_ids"]
    return list(value)


def read_examples(data: str, split: str) -> list[dict[str, Any]]:
    from rewriter.sft import TRAIN_NAME, VALIDATION_NAME, read_sft

    path = os.path.join(data, TRAIN_NAME if split == "train" else VALIDATION_NAME) if os.path.isdir(data) else data
    if not os.path.isfile(path):
        if split == "validation":
            return []
        raise UserError(f"--data {data}: {path} not found; pass an `export-sft` output directory")
    return read_sft(path)


def _batches(items: list[Encoded], batch_size: int, pad_id: int, torch):
    for i in range(0, len(items), batch_size):
        chunk = items[i: i + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            mask[row, :n] = 1
        yield ids, labels, mask


def _mean_loss(model, items: list[Encoded], batch_size: int, pad_id: int, device, torch) -> float | None:
    if not items:
        return None
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels, mask in _batches(items, batch_size, pad_id, torch):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(out.loss) * n
            count += n
    model.train()
    return total / max(count, 1)


def finetune(base: str, data: str, output_dir: str, config: FinetuneConfig = FinetuneConfig(), *,
             merge: bool = False) -> FinetuneResult:
    """Train a LoRA adapter on ``data`` (an ``export-sft`` directory) over the model in ``base``.

    Args:
        base: local base model directory (weights, config, tokenizer with a chat template).
        data: ``export-sft`` output directory (``train.jsonl``, optional ``validation.jsonl``).
        output_dir: gets ``adapter/``, ``merged/`` (with ``merge``) and ``finetune.json``.
        config: LoRA and optimiser settings.
        merge: also write the adapter merged into a full model directory.
    """
    torch, transformers, peft = require_finetune_extra()
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise UserError(f"--base {base}: no config.json; pass a local model directory (no hub downloads here)")
    t0 = time.monotonic()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    device = torch.device("cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    if tokenizer.chat_template is None:
        raise UserError(f"--base {base}: the tokenizer has no chat template; use an instruct/chat model")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_items = [encode_example(tokenizer, ex["messages"], config.max_seq_len) for ex in read_examples(data, "train")]
    val_items = [encode_example(tokenizer, ex["messages"], config.max_seq_len)
                 for ex in read_examples(data, "validation")]
    if not train_items:
        raise UserError(f"--data {data}: the training split is empty")

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.to(device)
    full = config.method == "full"
    if not full:
        lora = peft.LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules), task_type="CAUSAL_LM", bias="none",
        )
        model = peft.get_peft_model(model, lora)
    model.train()

    batches_per_epoch = math.ceil(len(train_items) / config.batch_size)
    steps = config.max_steps or max(1, math.ceil(config.epochs * batches_per_epoch / config.grad_accum))
    warmup = int(config.warmup_ratio * steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    val_before = _mean_loss(model, val_items, config.batch_size, pad_id, device, torch)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()

    order_rng = random.Random(config.seed)
    stream: list[Encoded] = []
    losses: list[float] = []
    for step in range(steps):
        step_loss = 0.0
        for _ in range(config.grad_accum):
            if len(stream) < config.batch_size:
                epoch = train_items[:]
                order_rng.shuffle(epoch)
                stream.extend(epoch)
            chunk, stream = stream[: config.batch_size], stream[config.batch_size:]
            ids, labels, mask = next(_batches(chunk, config.batch_size, pad_id, torch))
            with autocast:
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            (out.loss / config.grad_accum).backward()
            step_loss += float(out.loss.detach()) / config.grad_accum
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(round(step_loss, 5))
        if step % 50 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f", step + 1, steps, step_loss)
    val_after = _mean_loss(model, val_items, config.batch_size, pad_id, device, torch)

    os.makedirs(output_dir, exist_ok=True)
    adapter_dir = None if full else os.path.join(output_dir, ADAPTER_DIRNAME)
    if adapter_dir:
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
    merged_dir = None
    if merge or full:
        merged_dir = os.path.join(output_dir, MERGED_DIRNAME)
        merged = model if full else model.merge_and_unload()
        merged.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
        gen = os.path.join(base, "generation_config.json")
        if os.path.isfile(gen) and not os.path.isfile(os.path.join(merged_dir, "generation_config.json")):
            with open(gen, "rb") as src, open(os.path.join(merged_dir, "generation_config.json"), "wb") as dst:
                dst.write(src.read())
    result = FinetuneResult(adapter_dir, merged_dir, steps, losses, val_before, val_after, time.monotonic() - t0)
    report = {
        "base": os.path.abspath(base),
        "data": os.path.abspath(data),
        "config": asdict(config),
        "device": device.type,
        "train_examples": len(train_items),
        "validation_examples": len(val_items),
        "steps": steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "adapter_dir": None if full else ADAPTER_DIRNAME,
        "merged_dir": MERGED_DIRNAME if merged_dir else None,
        "seconds": round(result.seconds, 2),
    }
    with open(os.path.join(output_dir, REPORT_NAME), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return result


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv: list[str]) -> int:
    """``mmcorpus rewriter finetune``."""
    d = FinetuneConfig()
    parser = argparse.ArgumentParser(prog="mmcorpus rewriter finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="local base model directory")
    parser.add_argument("--data", required=True, help="export-sft output directory")
    parser.add_argument("--output", required=True, help="output directory (adapter/, merged/, finetune.json)")
    parser.add_argument("--merge", action="store_true", help="also write the merged full model to OUTPUT/merged")
    parser.add_argument("--full", action="store_true",
                        help="train every weight (no adapter); the model goes to OUTPUT/merged")
    parser.add_argument("--lora-r", type=int, default=d.lora_r)
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    parser.add_argument("--target-modules", default=",".join(d.target_modules))
    parser.add_argument("--learning-rate", "--lr", type=float, default=d.learning_rate)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--epochs", type=float, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum)
    parser.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    parser.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    parser.add_argument("--cpu-threads", type=int, help="torch threads on the CPU (default: torch's choice)")
    args = parser.parse_args(argv)
    try:
        config = FinetuneConfig(
            method="full" if args.full else "lora", lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
            learning_rate=args.learning_rate, warmup_ratio=args.warmup_ratio, max_steps=args.max_steps,
            epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
            max_seq_len=args.max_seq_len, seed=args.seed, device=args.device,
            cpu_threads=args.cpu_threads,
        )
    except ValueError as e:
        raise UserError(f"finetune: {e}") from e
    result = finetune(args.base, args.data, args.output, config, merge=args.merge)
    print(json.dumps({
        "adapter": result.adapter_dir, "merged": result.merged_dir, "steps": result.steps,
        "loss_first": result.losses[0], "loss_last": result.losses[-1],
        "val_loss_before": result.val_loss_before, "val_loss_after": result.val_loss_after,
        "seconds": round(result.seconds, 1),
    }))
    return 0
