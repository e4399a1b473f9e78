"""Retrieval over the user's own documents (RAG): extract text from files (extract.py), cut it into chunks that
know where they came from (chunk.py), embed them (embed.py), keep them in an embedded LanceDB table with vectors
and BM25 full text (index.py), fetch the best ones for a question (retrieve.py: hybrid search fused by reciprocal
rank fusion, optional cross-encoder rerank) and measure retrieval on questions made from the documents
(evaluate.py). `rag` knows nothing of language models beyond an embedding function."""

from gptsmith.rag.types import Chunk, Hit

__all__ = ["Chunk", "Hit"]
