"""What every self-test step gets (the device, CPU mode, a scratch folder) and the checks it raises with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "default"
SAMPLES = ROOT / "samples"


class Skip(Exception):
    """A step that cannot run here (no CUDA, no flashinfer, ...): reported as skipped with this reason."""


@dataclass
class Context:
    device: torch.device
    cpu_mode: bool
    tmp: Path

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """The models' run dtype: what production runs on a GPU, float32 on the CPU (what samples.json records)."""
        return torch.float32 if self.cpu_mode else torch.bfloat16

    def sync(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    def require_cuda(self, what: str = "needs CUDA") -> None:
        if not self.on_cuda:
            raise Skip(what)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.detach().float().cpu() - want.detach().float().cpu()).abs().max().item() if want.numel() else 0.0


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max error over the reference's largest magnitude: one tolerance for every size of output."""
    return max_error(got, want) / max(want.detach().float().abs().max().item(), 1e-12) if want.numel() else 0.0


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)
