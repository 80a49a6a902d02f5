"""Host-to-device copies of decoded images. A non_blocking copy from pageable memory is staged by the driver and
overlaps nothing; from pinned memory it is a true async copy. Pinned blocks come from torch's caching host
allocator, which records the copy on its stream and reuses a block only after the copy finished."""
from __future__ import annotations

import torch


def to_device(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`image` on `device`: through a pinned staging buffer and an async copy on CUDA, as is on the CPU."""
    if device.type != "cuda" or image.is_cuda:
        return image.to(device)
    staged = torch.empty(image.shape, dtype=image.dtype, pin_memory=True)
    staged.copy_(image)
    return staged.to(device, non_blocking=True)
