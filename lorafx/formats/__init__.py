"""File contracts shared with the ecosystem: PEFT adapter folders, bitsandbytes NF4 state,
Hugging Face checkpoint folders, safetensors, and the atomic writer every save goes through.
Nothing here imports the core: a format reads and writes files and dicts, not models."""
