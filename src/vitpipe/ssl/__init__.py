"""Self-supervised learning: the ViT backbone, objectives, their registry and the trainer."""
