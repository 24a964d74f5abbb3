"""Training runtime around a LoraModel: optimizers (LoRA+, 8-bit/4-bit states), training
checkpoints, memory accounting and NF4 saved-tensor hooks."""
