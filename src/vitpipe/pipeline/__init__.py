"""Data stage: sources -> WebDataset shards (ingest), manifest, verification, the shard loader."""
