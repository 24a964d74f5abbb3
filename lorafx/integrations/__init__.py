"""Training with the tools people already use: transformers' Trainer and TRL's trainers."""
