"""Bridges to other libraries' training and evaluation tools (each imported on use)."""
