"""Model code: ViT, DINOv3, the shared ViT block, classifier heads, DEIMv2, Qwen3-VL, weights and int8 quantization."""
