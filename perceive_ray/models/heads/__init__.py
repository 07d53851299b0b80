"""Heads trained on frozen CLIP features: RoPE, PACL, SPARC (PROTOCOLS §5)."""
