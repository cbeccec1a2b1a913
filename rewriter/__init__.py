"""The caption rewriter: prompts, seed annotation, fine-tune data and training, serving, client."""
