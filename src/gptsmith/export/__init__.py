"""Write our models in formats other tools load: GGUF for llama.cpp (and the tools built on it)."""

from gptsmith.export.gguf import DTYPES, GgufExport, export_gguf

__all__ = ["DTYPES", "GgufExport", "export_gguf"]
