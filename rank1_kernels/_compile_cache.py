"""Keep torch.compile's on-disk caches from replaying graphs built against another version of this package.

torch's AOTAutograd cache keys a compiled forward+backward on the Dynamo graph, the inputs and torch's settings.
A custom op in that graph is keyed by its name, and the Triton sources of the forward op: not by the Python
autograd formula registered for it, the backward op it calls, or a compiled extension. After an upgrade (or any
edit of a checkout) the cache may replay a backward built for the old code: a changed schema fails with "missing
value for argument", a changed formula silently computes the old gradient.

So on import the package appends a digest of its own code to `torch.compiler.config.cache_key_tag`, which torch
puts in every compile cache key. The cost: graphs compiled before a change of this package are compiled again
once. `RANK1_COMPILE_CACHE_TAG=0` leaves the tag alone (then clear the cache after upgrading:
`rm -rf /tmp/torchinductor_$USER`, or set `TORCHINDUCTOR_CACHE_DIR`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
TAG_PREFIX = "rank1_kernels="


def code_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """A digest of what the registered ops' behaviour depends on: every Python source of the package (contents)
    and its compiled extensions (size and modification time; hashing their bytes would cost milliseconds)."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        relative = path.relative_to(package_dir).as_posix().encode()
        if path.suffix == ".py":
            digest.update(relative + b"\0" + path.read_bytes() + b"\0")
        elif path.suffix in (".so", ".pyd"):
            stat = path.stat()
            digest.update(relative + f"\0{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def tag_compile_caches() -> str | None:
    """Append this package's code digest to torch's compile cache key tag (once). Returns the tag set, or None when
    the environment opts out or this torch has no such setting."""
    if os.environ.get("RANK1_COMPILE_CACHE_TAG", "1") == "0":
        return None
    config = getattr(getattr(torch, "compiler", None), "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return None  # older torch: no tag to set (see the module docstring for clearing the cache by hand)
    ours = TAG_PREFIX + code_digest()
    parts = [part for part in config.cache_key_tag.split(",") if part and not part.startswith(TAG_PREFIX)]
    config.cache_key_tag = ",".join(parts + [ours])
    return config.cache_key_tag
