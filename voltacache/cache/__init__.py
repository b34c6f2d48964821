"""Cross-request caches: stored images (semantic, L1) and intermediate latents (approximate, L2).

An index of prompt embeddings (pymilvus: a milvus-lite file by default, a Milvus server by URI)
points into a blob store (a local content-addressed folder, or an S3 bucket). Expiry, capacity and
eviction are enforced here, in our code: neither Milvus flavour enforces a TTL.
"""
