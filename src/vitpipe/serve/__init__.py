"""`vitpipe serve`: a search page and JSON API over a run's embeddings of a shard set."""
