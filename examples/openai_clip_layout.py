"""A small model in OpenAI's CLIP layout, the one ZSCL, MoE-Adapters4CL, DIKI and the paper's code carry as
clip/model.py: sequence-first nn.MultiheadAttention, residual blocks with ln_1/attn/ln_2/mlp(c_fc, gelu, c_proj),
a ViT visual tower with a [CLS] token and a causal text tower pooled at the end-of-text token (the largest token id).

Written for this package's examples and tests from the published structure of that layout (the `clip` package is not
installable from PyPI); sizes are tiny so that it runs on a CPU in milliseconds.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))  # fmt: skip
        self.ln_2 = nn.LayerNorm(d_model)
        self.attn_mask = attn_mask

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (tokens, batch, d_model), sequence-first."""
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, 3, H, W) -> (batch, output_dim), the [CLS] token projected."""
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class CLIP(nn.Module):
    def __init__(
        self,
        embed_dim: int = 16,
        image_resolution: int = 32,
        vision_layers: int = 2,
        vision_width: int = 32,
        vision_patch_size: int = 8,
        context_length: int = 12,
        vocab_size: int = 100,
        transformer_width: int = 32,
        transformer_heads: int = 4,
        transformer_layers: int = 2,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(
            image_resolution, vision_patch_size, vision_width, vision_layers, vision_width // 8, embed_dim
        )
        self.transformer = Transformer(
            transformer_width, transformer_layers, transformer_heads, self.build_attention_mask()
        )
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(transformer_width**-0.5 * torch.randn(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.659))

    def build_attention_mask(self) -> torch.Tensor:
        return torch.full((self.context_length, self.context_length), float("-inf")).triu(1)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """text: (batch, context_length) token ids, end-of-text = the largest id of each row."""
        x = self.token_embedding(text) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-to-text and text-to-image logits, (n_images, n_texts) and its transpose."""
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def random_captions(n: int, context_length: int = 12, vocab_size: int = 100, generator=None) -> torch.Tensor:
    """(n, context_length) token ids: start token vocab_size - 2, words, end-of-text vocab_size - 1 at a per-caption
    position, zeros after it (CLIP's tokenizer pads with 0)."""
    ids = torch.zeros(n, context_length, dtype=torch.int64)
    lengths = torch.randint(2, context_length, (n,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        ids[row, 0] = vocab_size - 2
        ids[row, 1:length] = torch.randint(1, vocab_size - 2, (length - 1,), generator=generator)
        ids[row, length] = vocab_size - 1
    return ids
