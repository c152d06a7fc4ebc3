"""Training on several processes (torchrun / accelerate launch): who is who, and the guard's agreement."""
