"""Adapters to the tools people already train with (each imports its tool only when imported)."""
