"""Plain PyTorch oracles of every op, one module per op family."""
