"""vitpipe: unlabeled images -> WebDataset shards -> a pretrained ViT -> honest numbers."""

__version__ = "0.1.0"
