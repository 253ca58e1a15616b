"""Data preparation: sources, the CoLLM protocol, and the prepared-directory format."""
