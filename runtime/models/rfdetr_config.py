"""RF-DETR's config.json (transformers' `RfDetrConfig` with its `rf_detr_dinov2` backbone): the inference-relevant
fields, checked when read."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.config import ConfigReader
from runtime.models.deimv2_config import ACTIVATION_NAMES
from runtime.models.vit_block import BlockConfig


@dataclass(frozen=True)
class RfDetrBackboneConfig:
    """The windowed DINOv2 ViT. Stage s of `out_indices` is the sequence after s layers (0: the embeddings)."""
    block: BlockConfig
    num_layers: int
    patch_size: int
    position_grid: int  # side of the square grid the stored position embeddings cover
    num_channels: int
    out_indices: tuple[int, ...]
    global_layers: tuple[bool, ...]  # per layer: attention over the whole image (else within each window)
    num_windows: int
    apply_layernorm: bool
    use_mask_token: bool

    @classmethod
    def from_dict(cls, bb: dict, source: str) -> RfDetrBackboneConfig:
        r = ConfigReader(bb, source)
        r.check(bb.get("model_type") == "rf_detr_dinov2",
                f"model_type {bb.get('model_type')!r} is not supported (only 'rf_detr_dinov2')")
        hidden = r.get("hidden_size", int, 768)
        num_layers = r.get("num_hidden_layers", int, 12)
        mlp_hidden = int(hidden * r.get("mlp_ratio", (int, float), 4))
        swiglu = r.get("use_swiglu_ffn", bool, False)
        qkv_bias = r.get("qkv_bias", bool, True)
        block = BlockConfig(
            hidden_size=hidden, num_heads=r.get("num_attention_heads", int, 12),
            # transformers' SwiGLU keeps two thirds of the MLP width, rounded up to a multiple of 8, and uses SiLU
            intermediate_size=(int(mlp_hidden * 2 / 3) + 7) // 8 * 8 if swiglu else mlp_hidden,
            hidden_act="silu" if swiglu else r.get("hidden_act", str, "gelu"),
            layer_norm_eps=r.get("layer_norm_eps", float, 1e-6),
            query_bias=qkv_bias, key_bias=qkv_bias, value_bias=qkv_bias, gated_mlp=swiglu, layer_scale=True)
        patch = r.pair("patch_size", 14)
        image = r.pair("image_size", 224)
        r.check(patch[0] == patch[1], f"patch_size must be square, got {list(patch)}")
        r.check(image[0] == image[1], f"image_size must be square (the position embeddings are a square grid), "
                                      f"got {list(image)}")
        if "out_indices" in bb:
            out_indices = r.int_list("out_indices")
        else:
            names = bb.get("out_features") or [f"stage{num_layers}"]
            r.check(all(isinstance(n, str) and (n == "stem" or n.startswith("stage") and n[5:].isdigit())
                        for n in names), f"out_features must be stage names like 'stage2', got {names!r}")
            out_indices = tuple(0 if n == "stem" else int(n[5:]) for n in names)
        r.check(len(out_indices) > 0 and list(out_indices) == sorted(set(out_indices)) and out_indices[0] >= 0
                and out_indices[-1] <= num_layers,
                f"out_indices must be increasing stage numbers in 0..{num_layers}, got {list(out_indices)}")
        # transformers derives the windowed layers from out_indices, but a value stored in config.json wins
        windowed = (r.int_list("window_block_indexes") if "window_block_indexes" in bb
                    else tuple(i for i in range(out_indices[-1] + 1) if i not in out_indices))
        num_windows = r.get("num_windows", int, 4)
        r.check(num_windows >= 1, f"num_windows must be at least 1, got {num_windows}")
        r.check(r.get("reshape_hidden_states", bool, True),
                "reshape_hidden_states=false is not supported (the projector needs feature maps)")
        return cls(block=block, num_layers=num_layers, patch_size=patch[0], position_grid=image[0] // patch[0],
                   num_channels=r.get("num_channels", int, 3), out_indices=out_indices,
                   global_layers=tuple(i not in windowed for i in range(num_layers)), num_windows=num_windows,
                   apply_layernorm=r.get("apply_layernorm", bool, True),
                   use_mask_token=r.get("use_mask_token", bool, True))


@dataclass(frozen=True)
class RfDetrConfig:
    """The inference-relevant fields of a transformers RfDetrConfig. Defaults equal transformers' defaults for
    fields missing from config.json."""
    backbone: RfDetrBackboneConfig
    id2label: dict[int, str]
    d_model: int
    hidden_expansion: float
    c2f_num_blocks: int
    activation_function: str
    layer_norm_eps: float
    decoder_layers: int
    decoder_ffn_dim: int
    decoder_self_attention_heads: int
    decoder_cross_attention_heads: int
    decoder_n_points: int
    decoder_activation_function: str
    num_queries: int
    group_detr: int

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> RfDetrConfig:
        r = ConfigReader(cfg, source)
        r.check(cfg.get("model_type") == "rf_detr", f"model_type must be 'rf_detr', got {cfg.get('model_type')!r}")
        bb = cfg.get("backbone_config")
        r.check(isinstance(bb, dict), "backbone_config must be an object (the rf_detr_dinov2 ViT config)")
        backbone = RfDetrBackboneConfig.from_dict(bb, f"{source} backbone_config")
        r.check(r.get("num_feature_levels", int, 1) == 1,
                "num_feature_levels must be 1 (RF-DETR's projector yields one level)")
        r.check(r.get("attention_bias", bool, True),
                "attention_bias=false is not supported (the decoder's self-attention has biases)")
        d_model = r.get("d_model", int, 256)
        out = cls(
            backbone=backbone,
            id2label=r.id2label(),
            d_model=d_model,
            hidden_expansion=r.get("hidden_expansion", float, 0.5),
            c2f_num_blocks=r.get("c2f_num_blocks", int, 3),
            activation_function=r.choice("activation_function", "silu", ACTIVATION_NAMES),
            layer_norm_eps=r.get("layer_norm_eps", float, 1e-5),
            decoder_layers=r.get("decoder_layers", int, 3),
            decoder_ffn_dim=r.get("decoder_ffn_dim", int, 2048),
            decoder_self_attention_heads=r.get("decoder_self_attention_heads", int, 8),
            decoder_cross_attention_heads=r.get("decoder_cross_attention_heads", int, 16),
            decoder_n_points=r.get("decoder_n_points", int, 4),
            decoder_activation_function=r.choice("decoder_activation_function", "relu", ACTIVATION_NAMES),
            num_queries=r.get("num_queries", int, 300),
            group_detr=r.get("group_detr", int, 13),
        )
        for heads in ("decoder_self_attention_heads", "decoder_cross_attention_heads"):
            r.check(d_model % getattr(out, heads) == 0, f"d_model={d_model} is not divisible by {heads}="
                                                        f"{getattr(out, heads)}")
        r.check(d_model % 4 == 0, f"d_model={d_model} must be divisible by 4 (sine embedding of 4 box coordinates)")
        r.check(out.num_queries > 0 and out.group_detr > 0 and out.decoder_n_points > 0,
                "num_queries, group_detr and decoder_n_points must be positive")
        return out
