"""`vitpipe curate`: shards in, curated shards out, every removal counted and listed by reason."""
