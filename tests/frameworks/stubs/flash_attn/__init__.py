"""Stand-in for flash-attn (see ../README.md): importable, never called."""
