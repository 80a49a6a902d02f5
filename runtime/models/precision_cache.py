"""The on-disk cache of precision `auto`'s measurements, as TensorRT keeps a timing cache: a start that finds its
key reads the choice instead of measuring, so every start on one machine serves the same precision, and restarts
skip the measurement.

The key is everything the choice depends on: the model's content digest (sha256 over its config and weight files),
the machine (CPU model name, torch's CPU capability, torch's thread count), the library versions (torch; the int8
backends available), the engine's settings (max batch, the explicit dtype/quantize) and MEASUREMENT, which changes
when the measurement's rules do. One JSON file holds every entry, and the file digests by (path, size, mtime) so a
cached start does not re-read gigabytes of weights. A start that must measure holds an exclusive lock on a file
beside the cache while it does, so replicas starting together measure once: the others wait, then read the
first one's entry. Writes go to a temporary file renamed over the old one, so no reader sees a torn file."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DIGESTED = ("config.json", "preprocessor_config.json")  # besides every *.safetensors and its index
CHUNK = 1 << 24


def default_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "roadwork-cascade" / "precision.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


@dataclass
class PrecisionCache:
    path: Path

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"entries": {}, "files": {}}
        except (OSError, ValueError) as e:
            log.warning("precision cache %s is unreadable (%s): measuring again and rewriting it", self.path, e)
            return {"entries": {}, "files": {}}
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict) \
                or not isinstance(data.get("files"), dict):
            log.warning("precision cache %s is not a cache this version wrote: measuring again", self.path)
            return {"entries": {}, "files": {}}
        return data

    def write(self, data: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("precision cache %s cannot be written (%s): the next start measures again", self.path, e)

    @contextlib.contextmanager
    def measuring(self):
        """Held while measuring: one replica measures, the others wait for its entry. Without a lock (an unwritable
        directory) each measures on its own."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.with_name(self.path.name + ".lock"), "a")
        except OSError as e:
            log.warning("precision cache %s cannot be locked (%s): measuring without it", self.path, e)
            yield
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def model_digest(self, model_dir: Path, data: dict) -> str:
        """sha256 over the model's files (names and digests); each file's digest is reused while its size and
        mtime are unchanged. Updates data["files"]."""
        files = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and (
            p.name in DIGESTED or p.name.endswith((".safetensors", ".safetensors.index.json"))))
        h = hashlib.sha256()
        for p in files:
            stat = p.stat()
            seen = data["files"].get(str(p.resolve()))
            if not (isinstance(seen, dict) and seen.get("size") == stat.st_size
                    and seen.get("mtime_ns") == stat.st_mtime_ns and isinstance(seen.get("sha256"), str)):
                seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(p)}
                data["files"][str(p.resolve())] = seen
            h.update(f"{p.name}\0{seen['sha256']}\0".encode())
        return h.hexdigest()


def machine() -> dict:
    # Imported here: server/config.py reads default_path() and must answer --help without loading torch.
    import torch

    from runtime.models.int8_dynamic import backend_available
    from runtime.options import INT8_BACKENDS
    return {"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "int8_backends": [b for b in INT8_BACKENDS if backend_available(b)]}


def entry_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
