"""Training components: model loading, losses, optimizers (the loop arrives with the trainer)."""
