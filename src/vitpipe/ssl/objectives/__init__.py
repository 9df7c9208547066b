"""vitpipe's own objectives, one package each (``objectives/<name>/``): its model and config
section in ``objective.py`` (which ends in the ``SPEC`` its entry point names), plus whatever else
belongs to it alone (CLIP's text tower, iGPT's pixel evals). Nothing here imports at package import."""
