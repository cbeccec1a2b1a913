"""Build a tiny random Llama model with a locally trained byte-level BPE tokenizer and a chat template.

No hub access: the tokenizer is trained with ``tokenizers`` on the given texts, the model is a random
``LlamaForCausalLM`` saved with ``save_pretrained``. vLLM's CPU build serves the result (the recipe in
ENVIRONMENT.md). Its text is random; tests use it to exercise real serving, structured output,
fine-tuning and the rewrite stage end to end.

Example:
    >>> from rewriter.tiny import TinyModelConfig, make_tiny_model
    >>> make_tiny_model("build/tiny", ["a dog on a beach", "two cats"], TinyModelConfig())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Iterable

# Special tokens. ``END`` closes every chat turn and is the model's EOS: a model that learned the
# format emits it right after the closing brace of its JSON answer.
PAD = "<|pad|>"
BOS = "<|bos|>"
END = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, END, *ROLE_TOKENS)

# One turn per message: ``<|role|>\n content <|end|>\n``; the generation prompt opens an assistant
# turn. The assistant's reply ends with END, which is the EOS token, so generation stops there.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

# JSON punctuation the rewriter's answers are made of; repeated in the tokenizer corpus so the BPE
# learns merges such as '", "' and '"}]' (a string can then close in one token).
_JSON_SHAPES = ('{"', '": "', '", "', '"}', '"}]', '"}, {"', '": [{"', '"}],', '": ["', '"]}')


@dataclass(frozen=True)
class TinyModelConfig:
    """Size of the tiny model and its tokenizer.

    Args:
        vocab_size: BPE vocabulary size including the 256 byte symbols and special tokens.
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: Llama dimensions.
        max_position_embeddings: longest sequence the model accepts.
        initializer_range: std of the random weights. Larger than Llama's 0.02 on purpose: with
            hidden_size 64 and the default, the output logits stay so flat that a LoRA adapter
            (which cannot touch ``lm_head``) can barely lower the loss below uniform.
        seed: torch seed of the random weights (same seed, same weights).

    Example:
        >>> TinyModelConfig(vocab_size=512).hidden_size
        64
    """

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = 2048
    initializer_range: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if self.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")


def _import_transformers():
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{e}. Building the tiny model needs the finetune extra: "
            "pip install torch==2.13.0 && pip install -e '.[finetune]'"
        ) from e
    return transformers


def tokenizer_corpus(texts: Iterable[str]) -> list[str]:
    """The texts plus JSON-shaped variants of them and the rewriter prompt, so the tokenizer knows
    the output format and encodes the (long) system prompt in few tokens."""
    from rewriter import prompts
    from rewriter.offline import QUESTIONS

    texts = [t.strip() for t in texts if t.strip()]
    # The prompt of every language the texts are in (English always): a Chinese system prompt left to
    # byte-level tokens would be ~3 tokens a character and crowd a 512-token context.
    langs = ["en"] + sorted({prompts.prompt_language(t) for t in texts} - {"en"})
    lines: list[str] = []
    for lang in langs:
        lines += [m["content"] for m in prompts.build_messages("caption", lang)] * 50
    for i, text in enumerate(texts):
        lang = prompts.prompt_language(text)
        question = QUESTIONS.get(lang, QUESTIONS["en"])
        raw = lang != "en"  # JSON as the model writes it (render_output); English lines as they always were
        lines.append(text)
        lines.append(json.dumps({"question": question, "answer": text}, ensure_ascii=not raw))
        if i % 4 == 0:
            lines.append(json.dumps({"qa": [{"question": "Describe the image.", "answer": text}], "caption": text},
                                    ensure_ascii=not raw))
    lines.extend(_JSON_SHAPES * 20)
    return lines


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast`` with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    transformers = _import_transformers()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(texts), trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(output_dir: str, texts: Iterable[str], config: TinyModelConfig = TinyModelConfig()) -> str:
    """Write a tiny random Llama model, its tokenizer and chat template to ``output_dir``.

    Args:
        output_dir: directory to create (``config.json``, ``model.safetensors``, tokenizer files).
        texts: captions (or any text) the tokenizer is trained on.
        config: model and tokenizer sizes.

    Returns:
        ``output_dir``.
    """
    transformers = _import_transformers()
    import torch

    tokenizer = train_tokenizer(texts, config.vocab_size)
    end_id = tokenizer.convert_tokens_to_ids(END)
    model_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=end_id,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        tie_word_embeddings=False,
    )
    torch.manual_seed(config.seed)
    model = transformers.LlamaForCausalLM(model_config)
    model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = model_config.pad_token_id
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "mmcorpus_tiny.json"), "w", encoding="utf-8") as f:
        json.dump({"tiny_model_config": asdict(config), "note": "random weights, for tests only"}, f, indent=1)
    return output_dir


def read_texts(path: str, limit: int | None = None) -> list[str]:
    """Caption texts from a ``.txt``/``.tsv`` file (first column) or a ``.jsonl`` file (``caption`` or ``text``)."""
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(texts) >= limit:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                row = json.loads(line)
                text = row.get("caption") or row.get("text") or ""
            else:
                text = line.split("\t", 1)[0]
            if text:
                texts.append(text)
    return texts


def write_template_seed(path: str, captions: list[str]) -> str:
    """A seed file whose answers are the offline template's (``rewriter.offline``), all ``status: ok``."""
    from rewriter import prompts
    from rewriter.offline import OFFLINE_MODEL, template_rewrite

    os.makedirs(path, exist_ok=True)
    seed_file = os.path.join(path, "seed.jsonl")
    with open(seed_file, "w", encoding="utf-8") as f:
        for i, caption in enumerate(captions):
            record = {
                "key": f"template{i:06d}", "caption": caption, "status": "ok", "reason": "ok",
                "model": OFFLINE_MODEL, "prompt_version": prompts.PROMPT_VERSION,
                "response": template_rewrite(caption),
            }
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    return seed_file


def make_template_teacher(base_dir: str, captions: list[str], output_dir: str, steps: int = 300,
                          learning_rate: float = 1e-2, cpu_threads: int | None = 1, max_examples: int = 400,
                          method: str = "lora", batch_size: int = 4) -> str:
    """Train a model that imitates the offline template, as a stand-in teacher for tests.

    A random model's answers never have the target shape, so a seed set annotated by it teaches
    nothing. The trained model has learned the JSON frame (its text is still garbage).

    ``method="lora"`` trains an adapter: serving it with ``--lora-modules teacher=DIR`` gives
    ``rewriter seed`` a local teacher whose answers mostly validate; returns ``OUTPUT/adapter``.
    ``method="full"`` trains every weight and returns the full model (``OUTPUT/merged``): that is
    the bilingual teacher (``make_bilingual_teacher``), because a LoRA adapter over the frozen
    64-wide model did not reliably pick the question's language from the prompt (docs/bilingual.md).
    """
    from rewriter.finetune import FinetuneConfig, finetune
    from rewriter.sft import ExportConfig, export_sft

    work = os.path.join(output_dir, "work")
    write_template_seed(os.path.join(work, "seed"), captions[:max_examples])
    export_sft(os.path.join(work, "seed"), os.path.join(work, "sft"), ExportConfig(validation_fraction=0.0))
    config = FinetuneConfig(method=method, max_steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                            lora_dropout=0.0, cpu_threads=cpu_threads)
    result = finetune(base_dir, os.path.join(work, "sft"), output_dir, config)
    return result.merged_dir if method == "full" else result.adapter_dir


# The bilingual teacher's recipe (docs/bilingual.md, "The bilingual template teacher").
BILINGUAL_TEACHER = {"vocab_size": 4096, "steps": 800, "learning_rate": 1e-2, "batch_size": 8, "per_language": 200}


def make_bilingual_teacher(output_dir: str, captions_by_lang: dict[str, list[str]], *,
                           steps: int = BILINGUAL_TEACHER["steps"],
                           learning_rate: float = BILINGUAL_TEACHER["learning_rate"],
                           per_language: int = BILINGUAL_TEACHER["per_language"], cpu_threads: int | None = 1) -> str:
    """A tiny model fully fine-tuned on the offline template's answers in several languages, each
    prompted exactly as the rewriter prompts it (``prompts.build_messages``, the caption's language).

    Args:
        output_dir: gets ``base/`` (the random tiny model, tokenizer trained on every caption given)
            and ``teacher/`` (the fine-tune; the servable model is ``teacher/merged``).
        captions_by_lang: captions per language; the first ``per_language`` of each are the training
            examples (interleaved), the rest only train the tokenizer. Keep test captions out of it.
    Returns:
        the fine-tuned model directory (serve it with ``rewriter.serving.VLLMServer``).
    """
    texts = [t for captions in captions_by_lang.values() for t in captions]
    base = make_tiny_model(os.path.join(output_dir, "base"), texts,
                           TinyModelConfig(vocab_size=BILINGUAL_TEACHER["vocab_size"]))
    heads = [captions[:per_language] for captions in captions_by_lang.values()]
    examples = [c for group in zip(*heads) for c in group]
    return make_template_teacher(base, examples, os.path.join(output_dir, "teacher"), steps=steps,
                                 learning_rate=learning_rate, cpu_threads=cpu_threads, max_examples=len(examples),
                                 method="full", batch_size=BILINGUAL_TEACHER["batch_size"])


def main(argv: list[str]) -> int:
    """``mmcorpus rewriter make-tiny-model``."""
    import argparse

    parser = argparse.ArgumentParser(prog="mmcorpus rewriter make-tiny-model", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument("--corpus", required=True,
                        help="captions for the tokenizer: .txt/.tsv (first column) or .jsonl (caption/text)")
    parser.add_argument("--limit", type=int, default=5000, help="read at most this many captions")
    parser.add_argument("--vocab-size", type=int, default=TinyModelConfig.vocab_size)
    parser.add_argument("--seed", type=int, default=TinyModelConfig.seed)
    parser.add_argument("--template-teacher", metavar="DIR",
                        help="also train a LoRA teacher stand-in that imitates the offline template (needs peft)")
    parser.add_argument("--teacher-steps", type=int, default=300)
    args = parser.parse_args(argv)
    from schemas.errors import UserError

    if not os.path.isfile(args.corpus):
        raise UserError(f"--corpus {args.corpus}: file not found; pass a caption file (e.g. data/sample/*.tsv)")
    texts = read_texts(args.corpus, args.limit)
    if not texts:
        raise UserError(f"--corpus {args.corpus}: no captions read")
    try:
        config = TinyModelConfig(vocab_size=args.vocab_size, seed=args.seed)
    except ValueError as e:
        raise UserError(f"make-tiny-model: {e}") from e
    make_tiny_model(args.output, texts, config)
    print(f"wrote tiny model to {args.output} ({len(texts)} captions for the tokenizer)")
    if args.template_teacher:
        adapter = make_template_teacher(args.output, texts, args.template_teacher, steps=args.teacher_steps)
        print(f"wrote template teacher adapter to {adapter}")
    return 0
