"""Pre-norm transformer encoder block shared by the ViT and DINOv3 backbones.

Parameter names follow DINOv3's Hugging Face layout (norm1, attention.{q,k,v,o}_proj, layer_scale1.lambda1,
norm2, mlp.*, layer_scale2.lambda1); ViT checkpoints are renamed into it at load time."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import ConfigReader
from runtime.errors import ModelLoadError

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ModelLoadError(f"config.json: hidden_act '{name}' is not supported (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class BlockConfig:
    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    query_bias: bool = True
    key_bias: bool = True
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    gated_mlp: bool = False
    layer_scale: bool = False

    @classmethod
    def from_config(cls, r: ConfigReader, layer_norm_eps: float, **variant) -> BlockConfig:
        """The keys ViT and DINOv3 configs name alike (`layer_norm_eps`: the family's default); `variant`: what
        differs between them (biases, gated MLP, layer scale)."""
        return cls(hidden_size=r.get("hidden_size", int), num_heads=r.get("num_attention_heads", int),
                   intermediate_size=r.get("intermediate_size", int), hidden_act=r.data.get("hidden_act", "gelu"),
                   layer_norm_eps=float(r.data.get("layer_norm_eps", layer_norm_eps)), **variant)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ModelLoadError(f"config.json: hidden_size {self.hidden_size} is not divisible by "
                                 f"num_attention_heads {self.num_heads}")
        activation(self.hidden_act)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(c, c, bias=cfg.query_bias)
        self.k_proj = nn.Linear(c, c, bias=cfg.key_bias)
        self.v_proj = nn.Linear(c, c, bias=cfg.value_bias)
        self.o_proj = nn.Linear(c, c, bias=cfg.proj_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, t, c = x.shape
        shape = (b, t, self.num_heads, c // self.num_heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if rope is not None:
            # cos/sin cover the whole sequence; prefix tokens carry cos=1, sin=0 so they pass through unrotated.
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c))


class Mlp(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class GatedMlp(nn.Module):
    """SwiGLU-style MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class Block(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = GatedMlp(cfg) if cfg.gated_mlp else Mlp(cfg)
        if cfg.layer_scale:
            self.layer_scale1 = LayerScale(cfg.hidden_size)
            self.layer_scale2 = LayerScale(cfg.hidden_size)
        else:
            self.layer_scale1 = self.layer_scale2 = nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x), rope))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))
