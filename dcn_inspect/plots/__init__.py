"""Figures made by the commands (one module per command)."""
