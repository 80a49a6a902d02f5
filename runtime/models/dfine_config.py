"""D-FINE's config.json (HGNetV2 backbone): the inference-relevant fields, checked when read. Field names are those of
Deimv2Config wherever the shared encoder, head and decoder modules read them."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.config import ConfigReader
from runtime.models.deimv2_config import ACTIVATION_NAMES, check_query_head
from runtime.models.hgnetv2 import HGNetV2Config


@dataclass(frozen=True)
class DFineConfig:
    """The inference-relevant fields of a transformers DFineConfig. Defaults equal transformers' defaults for
    fields missing from config.json."""
    backbone: HGNetV2Config
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
    depth_mult: float
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

    # D-FINE always gates its cross-attention and has one box head per decoder layer.
    use_gateway = True
    share_bbox_head = False

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> DFineConfig:
        r = ConfigReader(cfg, source)
        r.check(cfg.get("model_type") == "d_fine", f"model_type must be 'd_fine', got {cfg.get('model_type')!r}")
        bb = cfg.get("backbone_config")
        r.check(isinstance(bb, dict), "backbone_config must be an object (the HGNetV2 config)")
        r.check(bb.get("model_type") == "hgnet_v2",
                f"backbone_config.model_type {bb.get('model_type')!r} is not supported: only HGNetV2 ('hgnet_v2') "
                f"backbones are implemented")
        backbone = HGNetV2Config.from_dict(bb, f"{source} backbone_config")

        labels = r.id2label()

        acts = ACTIVATION_NAMES
        r.check(not cfg.get("learn_initial_query", False),
                "learn_initial_query=true is not supported (transformers' own inference path fails with it)")
        decoder_layers = r.get("decoder_layers", int, 6)
        eval_idx = r.get("eval_idx", int, -1)
        r.check(eval_idx in (-1, decoder_layers - 1),
                f"eval_idx={eval_idx} is not supported: only the last decoder layer (-1 or {decoder_layers - 1}) "
                f"can be evaluated")
        num_levels = r.get("num_feature_levels", int, 3)
        points = cfg.get("decoder_n_points", 4)
        if isinstance(points, int) and not isinstance(points, bool):
            points = [points] * num_levels
        points = ConfigReader({"decoder_n_points": points}, source).int_list("decoder_n_points")
        r.check(len(points) == num_levels and min(points) > 0,
                f"decoder_n_points must be a positive int or one per level ({num_levels}), got {list(points)}")
        eval_size = cfg.get("eval_size")
        if isinstance(eval_size, int) and not isinstance(eval_size, bool):
            eval_size = [eval_size, eval_size]
        anchor = cfg.get("anchor_image_size")
        r.check(anchor is None or (isinstance(anchor, list) and len(anchor) == 2),
                f"anchor_image_size must be null or [height, width], got {anchor!r}")

        out = cls(
            backbone=backbone,
            id2label=labels,
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
            eval_size=None if eval_size is None else ConfigReader({"eval_size": eval_size}, source).int_list(
                "eval_size"),
            normalize_before=r.get("normalize_before", bool, False),
            hidden_expansion=r.get("hidden_expansion", float, 1.0),
            depth_mult=r.get("depth_mult", float, 1.0),
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
        )
        out._validate(r)
        return out

    def _validate(self, r: ConfigReader) -> None:
        levels = len(self.backbone.out_indices)
        r.check(len(self.encoder_in_channels) == levels == len(self.decoder_in_channels),
                f"encoder_in_channels ({list(self.encoder_in_channels)}) and decoder_in_channels "
                f"({list(self.decoder_in_channels)}) need one entry per backbone output "
                f"(out_indices {list(self.backbone.out_indices)})")
        r.check(levels >= 2, f"the hybrid encoder needs at least 2 backbone outputs, got {levels}")
        r.check(all(0 <= i < levels for i in self.encode_proj_layers),
                f"encode_proj_layers must index the {levels} encoder levels, got {list(self.encode_proj_layers)}")
        r.check(self.num_feature_levels >= levels,
                f"num_feature_levels={self.num_feature_levels} is below the {levels} levels the encoder produces")
        check_query_head(r, self)
