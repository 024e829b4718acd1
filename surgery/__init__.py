"""surgery: score the sublayers of a decoder-only LLM, remove them physically, heal, export.

Importing this package is cheap: the heavy libraries (torch, transformers, peft, trl, lm-eval)
are imported by the modules that need them, never here.
"""

__version__ = "0.1.0"
