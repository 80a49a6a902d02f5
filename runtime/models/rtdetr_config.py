"""RT-DETR's and RT-DETRv2's config.json (ResNet-vd backbone): the inference-relevant fields, checked when read."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.config import ConfigReader
from runtime.models.deimv2_config import ACTIVATION_NAMES
from runtime.models.resnet_vd import ResNetVdConfig

MODEL_TYPES = ("rt_detr", "rt_detr_v2")
V1_OFFSET_SCALE = 0.5  # RT-DETR's deformable attention has this scale built in; v2 makes it decoder_offset_scale


@dataclass(frozen=True)
class RTDetrConfig:
    """The inference-relevant fields of transformers' RTDetrConfig / RTDetrV2Config. Defaults equal transformers'
    for fields missing from config.json. Field names match Deimv2Config's where the meaning is the same, so the
    shared encoder and attention modules read either."""
    model_type: str
    backbone: ResNetVdConfig
    id2label: dict[int, str]
    layer_norm_eps: float
    batch_norm_eps: float
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

    depth_mult = 1.0  # the shared hybrid encoder's CSP depth: RT-DETR's blocks always hold 3 RepVGG blocks

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def is_v2(self) -> bool:
        return self.model_type == "rt_detr_v2"

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> RTDetrConfig:
        r = ConfigReader(cfg, source)
        model_type = cfg.get("model_type")
        r.check(model_type in MODEL_TYPES, f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
        v2 = model_type == "rt_detr_v2"
        r.check(not cfg.get("use_timm_backbone", False),
                "use_timm_backbone=true is not supported: only the transformers ResNet-vd backbone is implemented")
        r.check(cfg.get("backbone") is None,
                f"backbone={cfg.get('backbone')!r} is not supported: the backbone must be given as backbone_config "
                f"(a ResNet-vd config)")
        bb = cfg.get("backbone_config")
        if bb is None:  # transformers' default: ResNet-50-vd, stages 2..4
            bb = {"out_indices": [2, 3, 4]}
        r.check(isinstance(bb, dict), "backbone_config must be an object (the ResNet-vd config)")
        backbone = ResNetVdConfig.from_dict(bb, f"{source} backbone_config")
        r.check(not cfg.get("learn_initial_query", False),
                "learn_initial_query=true is not supported (transformers' own inference path fails with it)")

        num_levels = r.get("num_feature_levels", int, 3)
        points = r.get("decoder_n_points", int, 4)
        r.check(points > 0, f"decoder_n_points must be positive, got {points}")
        if v2:
            n_levels = r.get("decoder_n_levels", int, 3)
            r.check(n_levels == num_levels, f"decoder_n_levels={n_levels} must equal num_feature_levels={num_levels} "
                                            f"(transformers fails otherwise)")
        eval_size = cfg.get("eval_size")
        anchor = cfg.get("anchor_image_size")
        r.check(anchor is None or (isinstance(anchor, list) and len(anchor) == 2),
                f"anchor_image_size must be null or [height, width], got {anchor!r}")
        acts = ACTIVATION_NAMES
        out = cls(
            model_type=model_type,
            backbone=backbone,
            id2label=r.id2label(),
            layer_norm_eps=r.get("layer_norm_eps", float, 1e-5),
            batch_norm_eps=r.get("batch_norm_eps", float, 1e-5),
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
            eval_size=None if eval_size is None else (eval_size,) if isinstance(eval_size, int)
            else r.int_list("eval_size"),
            normalize_before=r.get("normalize_before", bool, False),
            hidden_expansion=r.get("hidden_expansion", float, 1.0),
            d_model=r.get("d_model", int, 256),
            num_queries=r.get("num_queries", int, 300),
            decoder_in_channels=r.int_list("decoder_in_channels", [256, 256, 256]),
            decoder_ffn_dim=r.get("decoder_ffn_dim", int, 1024),
            num_feature_levels=num_levels,
            points_per_level=(points,) * num_levels,
            decoder_layers=r.get("decoder_layers", int, 6),
            decoder_attention_heads=r.get("decoder_attention_heads", int, 8),
            decoder_activation_function=r.choice("decoder_activation_function", "relu", acts),
            decoder_offset_scale=r.get("decoder_offset_scale", float, 0.5) if v2 else V1_OFFSET_SCALE,
            decoder_method=r.choice("decoder_method", "default", ("default", "discrete")) if v2 else "default",
            anchor_image_size=None if anchor is None else r.int_list("anchor_image_size"),
        )
        out._validate(r)
        return out

    def _validate(self, r: ConfigReader) -> None:
        n_in = len(self.backbone.out_indices)
        r.check(len(self.encoder_in_channels) == n_in,
                f"encoder_in_channels has {len(self.encoder_in_channels)} entries but the backbone yields {n_in} maps "
                f"(backbone_config out_indices {list(self.backbone.out_indices)})")
        r.check(n_in >= 1, "the backbone must yield at least one map")
        r.check(all(0 <= i < n_in for i in self.encode_proj_layers),
                f"encode_proj_layers must index the {n_in} encoder levels, got {list(self.encode_proj_layers)}")
        r.check(len(self.decoder_in_channels) == n_in and all(c == self.encoder_hidden_dim
                                                                for c in self.decoder_in_channels),
                f"decoder_in_channels must be encoder_hidden_dim={self.encoder_hidden_dim} for each of the {n_in} "
                f"encoder maps, got {list(self.decoder_in_channels)}")
        r.check(self.num_feature_levels >= n_in,
                f"num_feature_levels={self.num_feature_levels} is below the {n_in} levels the encoder produces")
        r.check(self.num_feature_levels <= n_in + 1 or self.d_model == self.encoder_hidden_dim,
                f"more than one extra decoder level needs d_model == encoder_hidden_dim (transformers feeds every "
                f"extra level from the last encoder map), got {self.d_model} and {self.encoder_hidden_dim}")
        r.check(self.d_model % self.decoder_attention_heads == 0,
                f"d_model={self.d_model} is not divisible by decoder_attention_heads={self.decoder_attention_heads}")
        r.check(self.encoder_hidden_dim % self.encoder_attention_heads == 0,
                f"encoder_hidden_dim={self.encoder_hidden_dim} is not divisible by "
                f"encoder_attention_heads={self.encoder_attention_heads}")
        r.check(self.encoder_hidden_dim % 4 == 0,
                f"encoder_hidden_dim={self.encoder_hidden_dim} must be divisible by 4 (2D sine position embedding)")
        r.check(int(self.encoder_hidden_dim * self.hidden_expansion) > 0,
                f"hidden_expansion={self.hidden_expansion} leaves no channels")
        r.check(self.num_queries > 0, f"num_queries must be positive, got {self.num_queries}")
        r.check(self.decoder_layers > 0, f"decoder_layers must be positive, got {self.decoder_layers}")
        r.check(self.anchor_image_size is None or len(self.feat_strides) == self.num_feature_levels,
                f"anchor_image_size needs one feat_strides entry per level ({self.num_feature_levels}), "
                f"got {list(self.feat_strides)}")
