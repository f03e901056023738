"""Publish a model directory into a Hugging Face cache under a hub id, offline, in the layout
huggingface_hub itself writes, through its own helpers: blobs named by their etag (git's blob
sha1, or sha256 for LFS files such as weights), `snapshots/<commit>/` of relative symlinks to
them, `refs/<branch or tag>` naming the commit, and (huggingface_hub >= 1.x) the commit's
tree listing, which older versions did not write (tree_cache=False). huggingface_hub (and so transformers, the
lab and vLLM) then resolve the id from this cache with HF_HUB_OFFLINE=1, as on a host that
downloaded the model once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def etag(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in LFS_SUFFIXES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def publish(model_dir: Path, hf_home: Path, repo_id: str, revision: str = "main",
            extra_files: dict[str, bytes] | None = None, tree_cache: bool = True) -> str:
    """Cache `model_dir` (plus `extra_files`) as `repo_id` at `revision`; returns the commit."""
    from huggingface_hub.file_download import (
        _cache_commit_hash_for_specific_revision,
        _create_symlink,
        repo_folder_name,
    )

    storage = hf_home / "hub" / repo_folder_name(repo_id=repo_id, repo_type="model")
    staged = {p.relative_to(model_dir).as_posix(): p for p in sorted(model_dir.rglob("*")) if p.is_file()}
    extra = storage / ".extra"
    for name, data in (extra_files or {}).items():
        (extra / name).parent.mkdir(parents=True, exist_ok=True)
        (extra / name).write_bytes(data)
        staged[name] = extra / name
    tags = {name: etag(p) for name, p in staged.items()}
    commit = hashlib.sha1("".join(f"{n}\0{t}\n" for n, t in sorted(tags.items())).encode()).hexdigest()
    for name, p in staged.items():
        blob = storage / "blobs" / tags[name]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(p.read_bytes())
        pointer = storage / "snapshots" / commit / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(pointer), new_blob=False)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
    if tree_cache:
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

        entries = {}
        for name, p in staged.items():
            size = p.stat().st_size
            lfs = tags[name] if p.suffix in LFS_SUFFIXES else None
            entries[name] = TreeCacheEntry(size=size, blob_id=tags[name], lfs_sha256=lfs,
                                           lfs_size=size if lfs else None)
        write_tree_cache(str(storage), commit, entries)
    if extra.exists():
        import shutil

        shutil.rmtree(extra)
    readable(hf_home)
    return commit


def readable(root: Path) -> None:
    """World-readable, as a cache shared with containers running as another user must be."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                os.chmod(p, 0o644)
