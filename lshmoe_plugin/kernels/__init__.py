"""Fused GPU implementations of the compressor's stages (Triton); the PyTorch modules stay the reference."""
