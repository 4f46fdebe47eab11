"""Reading a Hugging Face Llama checkpoint in place: config.json, safetensors headers, tokenizer.

Nothing here touches torch devices or copies weights; it only says where every byte is.
"""
