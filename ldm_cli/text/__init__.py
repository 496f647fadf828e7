"""Layer 2: prompts to tokens: the CLIP tokenizer, A1111 prompt grammar and emphasis, chunks,
batches, textual-inversion embeddings, prompts files.
"""
