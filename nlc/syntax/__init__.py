"""Parsers: the .nl grammar, the expression grammar, the position-keeping YAML loader."""
