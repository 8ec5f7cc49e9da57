"""Trainers: datasets from the conversation log, LoRA training, evaluation, gating."""
