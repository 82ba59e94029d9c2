"""Exports of a trained adapter for where models run: a merged transformers model directory (merged.py)."""
