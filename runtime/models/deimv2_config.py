"""DEIMv2's config.json (DINOv3-backbone variant): the inference-relevant fields, checked when read."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.config import ConfigReader
from runtime.models.dinov3 import DINOv3Config

ACTIVATION_NAMES = ("relu", "silu", "swish", "gelu")  # deimv2_encoder.ACTIVATIONS builds these


@dataclass(frozen=True)
class Deimv2Config:
    """The inference-relevant fields of a transformers Deimv2Config (DINOv3 backbone). Defaults equal
    transformers' defaults for fields missing from config.json."""
    backbone: DINOv3Config
    backbone_hidden_size: int
    backbone_patch_size: int
    backbone_num_layers: int
    backbone_num_prefix_tokens: int
    backbone_out_indices: tuple[int, ...]
    backbone_apply_layernorm: bool
    id2label: dict[int, str]
    layer_norm_eps: float
    batch_norm_eps: float
    spatial_tuning_adapter_inplanes: int
    encoder_type: str
    encoder_hidden_dim: int
    encoder_in_channels: tuple[int, ...]
    feat_strides: tuple[int, ...]
    encoder_layers: int
    encoder_ffn_dim: int
    encoder_attention_heads: int
    encode_proj_layers: tuple[int, ...]
    positional_encoding_temperature: float
    encoder_activation_function: str
    activation_function: str
    eval_size: tuple[int, ...] | None
    normalize_before: bool
    hidden_expansion: float
    depth_mult: float
    encoder_has_trailing_conv: bool
    d_model: int
    num_queries: int
    decoder_in_channels: tuple[int, ...]
    decoder_ffn_dim: int
    num_feature_levels: int
    points_per_level: tuple[int, ...]
    decoder_layers: int
    decoder_attention_heads: int
    decoder_activation_function: str
    decoder_offset_scale: float
    decoder_method: str
    anchor_image_size: tuple[int, int] | None
    max_num_bins: int
    reg_scale: float
    up: float
    top_prob_values: int
    lqe_hidden_dim: int
    lqe_layers: int
    use_gateway: bool
    share_bbox_head: bool

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def num_encoder_outputs(self) -> int:
        return 2 if self.encoder_type == "lite" else len(self.encoder_in_channels)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> Deimv2Config:
        r = ConfigReader(cfg, source)
        r.check(cfg.get("model_type") == "deimv2",
                f"model_type must be 'deimv2', got {cfg.get('model_type')!r}")
        bb = cfg.get("backbone_config")
        r.check(isinstance(bb, dict), "backbone_config must be an object (the DINOv3 ViT config)")
        bb_type = bb.get("model_type")
        r.check(bb_type == "dinov3_vit",
                f"backbone_config.model_type {bb_type!r} is not supported: only the DINOv3 backbone variant "
                f"('dinov3_vit') is implemented (HGNetV2 DEIMv2 models are not)")
        b = ConfigReader(bb, f"{source} backbone_config")
        backbone = DINOv3Config.from_dict(bb, b.source)
        num_layers = backbone.num_layers
        b.check(backbone.patch_size[0] == backbone.patch_size[1],
                f"patch_size must be square, got {backbone.patch_size}")
        if "out_indices" in bb:
            out_indices = b.int_list("out_indices")
        else:
            names = bb.get("out_features") or [f"stage{num_layers}"]
            b.check(all(isinstance(n, str) and n.startswith("stage") and n[5:].isdigit() for n in names),
                    f"out_features must be stage names like 'stage6', got {names!r}")
            out_indices = tuple(int(n[5:]) for n in names)
        b.check(len(out_indices) == 3,
                f"out_indices must name 3 layers (one per stride 8/16/32 map), got {list(out_indices)}")
        b.check(list(out_indices) == sorted(set(out_indices)) and 1 <= out_indices[0]
                and out_indices[-1] <= num_layers,
                f"out_indices must be increasing layer numbers in 1..{num_layers}, got {list(out_indices)}")

        labels = r.id2label()

        acts = ACTIVATION_NAMES
        r.check(not cfg.get("learn_initial_query", False),
                "learn_initial_query=true is not supported (transformers' own inference path fails with it)")
        r.choice("encoder_fuse_op", "sum", ("sum",),
                 "; DEIMv2's CSP blocks take encoder_hidden_dim channels, which only sum fusion produces")
        decoder_layers = r.get("decoder_layers", int, 6)
        eval_idx = r.get("eval_idx", int, -1)
        r.check(eval_idx in (-1, decoder_layers - 1),
                f"eval_idx={eval_idx} is not supported: only the last decoder layer (-1 or {decoder_layers - 1}) "
                f"can be evaluated (transformers fails on other values too)")
        num_levels = r.get("num_feature_levels", int, 3)
        points = cfg.get("decoder_n_points", 4)
        if isinstance(points, int) and not isinstance(points, bool):
            points = [points] * num_levels
        points = ConfigReader({"decoder_n_points": points}, source).int_list("decoder_n_points")
        r.check(len(points) == num_levels and min(points) > 0,
                f"decoder_n_points must be a positive int or one per level ({num_levels}), got {list(points)}")
        eval_size = cfg.get("eval_size")
        anchor = cfg.get("anchor_image_size")
        r.check(anchor is None or (isinstance(anchor, list) and len(anchor) == 2),
                f"anchor_image_size must be null or [height, width], got {anchor!r}")

        out = cls(
            backbone=backbone,
            backbone_hidden_size=backbone.block.hidden_size,
            backbone_patch_size=backbone.patch_size[0],
            backbone_num_layers=num_layers,
            backbone_num_prefix_tokens=1 + backbone.num_register_tokens,
            backbone_out_indices=out_indices,
            backbone_apply_layernorm=b.get("apply_layernorm", bool, True),
            id2label=labels,
            layer_norm_eps=r.get("layer_norm_eps", float, 1e-5),
            batch_norm_eps=r.get("batch_norm_eps", float, 1e-5),
            spatial_tuning_adapter_inplanes=r.get("spatial_tuning_adapter_inplanes", int, 16),
            encoder_type=r.choice("encoder_type", "hybrid", ("hybrid", "lite")),
            encoder_hidden_dim=r.get("encoder_hidden_dim", int, 256),
            encoder_in_channels=r.int_list("encoder_in_channels", [512, 1024, 2048]),
            feat_strides=r.int_list("feat_strides", [8, 16, 32]),
            encoder_layers=r.get("encoder_layers", int, 1),
            encoder_ffn_dim=r.get("encoder_ffn_dim", int, 1024),
            encoder_attention_heads=r.get("encoder_attention_heads", int, 8),
            encode_proj_layers=r.int_list("encode_proj_layers", [2]),
            positional_encoding_temperature=r.get("positional_encoding_temperature", float, 10000.0),
            encoder_activation_function=r.choice("encoder_activation_function", "gelu", acts),
            activation_function=r.choice("activation_function", "silu", acts),
            eval_size=None if eval_size is None else r.int_list("eval_size"),
            normalize_before=r.get("normalize_before", bool, False),
            hidden_expansion=r.get("hidden_expansion", float, 1.0),
            depth_mult=r.get("depth_mult", float, 1.0),
            encoder_has_trailing_conv=r.get("encoder_has_trailing_conv", bool, True),
            d_model=r.get("d_model", int, 256),
            num_queries=r.get("num_queries", int, 300),
            decoder_in_channels=r.int_list("decoder_in_channels", [256, 256, 256]),
            decoder_ffn_dim=r.get("decoder_ffn_dim", int, 1024),
            num_feature_levels=num_levels,
            points_per_level=points,
            decoder_layers=decoder_layers,
            decoder_attention_heads=r.get("decoder_attention_heads", int, 8),
            decoder_activation_function=r.choice("decoder_activation_function", "relu", acts),
            decoder_offset_scale=r.get("decoder_offset_scale", float, 0.5),
            decoder_method=r.choice("decoder_method", "default", ("default", "discrete")),
            anchor_image_size=None if anchor is None else r.int_list("anchor_image_size"),
            max_num_bins=r.get("max_num_bins", int, 32),
            reg_scale=r.get("reg_scale", float, 4.0),
            up=r.get("up", float, 0.5),
            top_prob_values=r.get("top_prob_values", int, 4),
            lqe_hidden_dim=r.get("lqe_hidden_dim", int, 64),
            lqe_layers=r.get("lqe_layers", int, 2),
            use_gateway=r.get("use_gateway", bool, True),
            share_bbox_head=r.get("share_bbox_head", bool, False),
        )
        out._validate(r)
        return out

    def _validate(self, r: ConfigReader) -> None:
        r.check(len(self.encoder_in_channels) == 3,
                f"encoder_in_channels must have 3 entries (the DINOv3 encoder yields 3 maps), "
                f"got {list(self.encoder_in_channels)}")
        r.check(all(0 <= i < 3 for i in self.encode_proj_layers),
                f"encode_proj_layers must index the 3 encoder levels, got {list(self.encode_proj_layers)}")
        r.check(self.num_feature_levels >= self.num_encoder_outputs,
                f"num_feature_levels={self.num_feature_levels} is below the {self.num_encoder_outputs} levels the "
                f"{self.encoder_type} encoder produces")
        check_query_head(r, self)


def check_query_head(r: ConfigReader, cfg) -> None:
    """The encoder, decoder and FDR fields DEIMv2 and D-FINE share (their configs name them alike)."""
    r.check(cfg.decoder_in_channels[-1] == cfg.encoder_hidden_dim,
            f"decoder_in_channels[-1]={cfg.decoder_in_channels[-1]} must equal encoder_hidden_dim="
            f"{cfg.encoder_hidden_dim}")
    r.check(cfg.d_model % cfg.decoder_attention_heads == 0,
            f"d_model={cfg.d_model} is not divisible by decoder_attention_heads={cfg.decoder_attention_heads}")
    r.check(cfg.encoder_hidden_dim % cfg.encoder_attention_heads == 0,
            f"encoder_hidden_dim={cfg.encoder_hidden_dim} is not divisible by "
            f"encoder_attention_heads={cfg.encoder_attention_heads}")
    r.check(cfg.encoder_hidden_dim % 4 == 0,
            f"encoder_hidden_dim={cfg.encoder_hidden_dim} must be divisible by 4 (2D sine position embedding)")
    r.check(cfg.max_num_bins > 2 and cfg.max_num_bins % 2 == 0,
            f"max_num_bins must be an even number above 2, got {cfg.max_num_bins}")
    r.check(0 < cfg.top_prob_values <= cfg.max_num_bins + 1,
            f"top_prob_values must be in 1..{cfg.max_num_bins + 1}, got {cfg.top_prob_values}")
    r.check(cfg.num_queries > 0, f"num_queries must be positive, got {cfg.num_queries}")
    r.check(cfg.anchor_image_size is None or len(cfg.feat_strides) == cfg.num_feature_levels,
            f"anchor_image_size needs one feat_strides entry per level ({cfg.num_feature_levels}), "
            f"got {list(cfg.feat_strides)}")
