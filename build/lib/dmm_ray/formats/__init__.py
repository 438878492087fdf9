"""Checkpoint formats: the original LDM single-file layout (export), official DMM UNet interop."""
