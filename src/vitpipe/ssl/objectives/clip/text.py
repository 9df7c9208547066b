"""Text side of image-text objectives: an offline byte-level BPE fitted on the training captions,
tokenisation in the loader workers, and a causal text transformer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitpipe.ssl.vit import LN_EPS, Block, init_weights

SPECIAL = ["[PAD]", "[SOT]", "[EOT]"]
PAD, SOT, EOT = 0, 1, 2


def fit_bpe(captions, vocab_size: int, lowercase: bool) -> bytes:
    """A byte-level BPE trained on ``captions`` (no download: the vocabulary is the data's own).
    Captions are NFKC-normalised, runs of whitespace collapsed and the ends stripped (as open_clip
    cleans text before its tokenizer, so an exported run tokenises alike there), then lower-cased."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
         *([normalizers.Lowercase()] if lowercase else [])])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(captions, trainer)
    return tokenizer.to_str().encode()


class Tokenize:
    """Batch hook: captions -> [B, context] token ids ([SOT] ... [EOT], padded with [PAD]); counts
    captions cut at the context length. Picklable: the tokenizer is rebuilt in each worker."""

    def __init__(self, tokenizer_json: bytes, context_length: int) -> None:
        self.tokenizer_json, self.context_length = tokenizer_json, context_length
        self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_json": self.tokenizer_json, "context_length": self.context_length, "_tokenizer": None}

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, int]:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.tokenizer_json.decode())
        encodings = self._tokenizer.encode_batch(captions)
        rows = [[SOT, *encoding.ids][: self.context_length - 1] + [EOT] for encoding in encodings]
        truncated = sum(len(encoding.ids) + 2 > self.context_length for encoding in encodings)
        # padded to the batch's longest caption, not the context: under the causal mask no position
        # up to [EOT] sees the padding after it, so the features are the same and the work is less
        tokens = torch.full((len(captions), max(map(len, rows), default=2)), PAD, dtype=torch.long)
        for row, ids in enumerate(rows):
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens, truncated

    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        batch["tokens"], batch["captions_truncated"] = self.encode(batch["text"])
        return batch


class TextTransformer(nn.Module):
    """Token + learned position embeddings, pre-norm causal blocks, features at the [EOT] token."""

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed_dim = width
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.apply(init_weights)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, W], each position attending to itself and earlier ones only."""
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x, is_causal=True)
        return self.norm(x)

    def pool(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, W] -> [B, W]: the [EOT] position, which has seen the whole caption."""
        end = (tokens == EOT).int().argmax(dim=1)
        return features[torch.arange(len(tokens), device=tokens.device), end]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(tokens), tokens)
