"""A tiny random-weight BLIP-2 (vision tower + Q-Former + Llama) built locally, for vLLM's CPU build.

BLIP-2 is the image architecture whose vLLM import path needs no torchvision (LLaVA, PaliGemma and the
Qwen-VL family go through ``pixtral.py`` → ``torchvision``, which the CPU venv cannot load; see
docs/rlaifv.md). Its weights are random, its tokenizer is ``rewriter.tiny``'s byte-level BPE plus an
``<image>`` token; vLLM puts ``num_query_tokens`` image tokens at the start of the prompt.
"""

from __future__ import annotations

import os

IMAGE_TOKEN = "<image>"
NUM_QUERY_TOKENS = 4


def make_tiny_blip2(output_dir: str, texts: list[str], seed: int = 0) -> str:
    """Write config, weights, tokenizer and processor of a tiny random BLIP-2 to ``output_dir``."""
    import torch
    import transformers

    from rewriter.tiny import BOS, END, PAD, train_tokenizer

    tok = train_tokenizer(texts, 1024)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.image_token = IMAGE_TOKEN
    text = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
        bos_token_id=tok.convert_tokens_to_ids(BOS), eos_token_id=tok.convert_tokens_to_ids(END),
        pad_token_id=tok.convert_tokens_to_ids(PAD), tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"])
    # 32x32 input, 16x16 patches: the vision tower sees 4 patches + CLS; images are resized to that.
    vision = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=16)
    qformer = transformers.Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, encoder_hidden_size=32, vocab_size=64,
                                              max_position_embeddings=64)
    cfg = transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                   text_config=text.to_dict(), num_query_tokens=NUM_QUERY_TOKENS,
                                   image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN))
    cfg.architectures = ["Blip2ForConditionalGeneration"]
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(cfg)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tok.save_pretrained(output_dir)
    # the PIL image processor (transformers falls back to it without torchvision)
    processor = transformers.Blip2Processor(
        image_processor=transformers.BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok, num_query_tokens=NUM_QUERY_TOKENS)
    processor.save_pretrained(output_dir)
    return output_dir
