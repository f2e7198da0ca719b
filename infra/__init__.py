"""What is not the method: the command line, torchrun, checkpoints, logging and the memory plan (docs/architecture.md)."""
