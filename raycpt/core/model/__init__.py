"""Models: load Hugging Face causal LMs and tokenizers (loading.py), LoRA / DoRA via PEFT (adapters.py), DDP and
FSDP2 wrapping (parallel.py), the training losses, fused and chunked (loss.py). Imports the ground floor only."""
