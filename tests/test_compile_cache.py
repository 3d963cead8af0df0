"""torch.compile's caches key custom ops by name, not by their autograd code: importing rank1_kernels adds a digest
of the package's code to torch's cache key tag (rank1_kernels/_compile_cache.py), so an upgrade or an edit does not
replay a backward compiled for the old code."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rank1_kernels
from rank1_kernels import _compile_cache

REPO = Path(__file__).resolve().parents[1]
needs_tag = pytest.mark.skipif(not hasattr(torch.compiler, "config"), reason="this torch has no compile cache key tag")


@needs_tag
def test_importing_the_package_tags_torch_compile_caches():
    assert rank1_kernels  # imported above
    assert _compile_cache.TAG_PREFIX + _compile_cache.code_digest() in torch.compiler.config.cache_key_tag.split(",")


def test_the_digest_follows_every_source_and_extension(tmp_path):
    package = tmp_path / "rank1_kernels"
    shutil.copytree(_compile_cache.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = _compile_cache.code_digest(package)
    assert before == _compile_cache.code_digest(_compile_cache.PACKAGE_DIR)  # contents, not where they are
    (package / "__pycache__").mkdir(exist_ok=True)
    (package / "__pycache__" / "stale.pyc").write_bytes(b"\0")
    assert _compile_cache.code_digest(package) == before, "bytecode caches are not code"
    source = package / "cuda_backend.py"
    source.write_text(source.read_text() + "\n# an edit of the backward glue\n")
    edited = _compile_cache.code_digest(package)
    assert edited != before
    (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"a build")
    assert _compile_cache.code_digest(package) != edited, "a compiled extension is part of the code"


@needs_tag
def test_the_users_own_tag_is_kept_and_ours_is_not_repeated():
    before = torch.compiler.config.cache_key_tag
    # torch's own patch(): pytest's monkeypatch cannot see a config module's settings and would delete this one.
    with torch.compiler.config.patch(cache_key_tag="my-experiment,rank1_kernels=0123456789abcdef"):
        tag = _compile_cache.tag_compile_caches()
        assert tag == "my-experiment," + _compile_cache.TAG_PREFIX + _compile_cache.code_digest()
        assert _compile_cache.tag_compile_caches() == tag
    assert torch.compiler.config.cache_key_tag == before


@needs_tag
def test_the_environment_can_leave_the_tag_alone():
    script = "import torch, rank1_kernels; print(repr(torch.compiler.config.cache_key_tag))"
    environment = {**os.environ, "RANK1_COMPILE_CACHE_TAG": "0", "TORCH_COMPILE_CACHE_KEY_TAG": "theirs"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=environment)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "'theirs'"
