"""arrag: AR-RAG (autoregressive patch-level retrieval augmentation) benchmark harness."""

__version__ = "0.1.0"
