"""Checkpoints that a lost rank cannot leave half-written behind `latest`, and the lsh_moe settings a resume changes.

DeepSpeed's ``save_checkpoint`` lets rank 0 write ``latest`` as soon as rank 0's own files are written; its only
barrier comes after that, so a rank that dies while writing its expert or optimizer shard leaves ``latest`` naming
a tag with files missing. Here the tag is saved with ``save_latest=False``; once every rank's save has returned,
rank 0 writes a manifest of the tag's files and sizes, and only then ``latest`` (replaced atomically). A resume
loads the tag ``latest`` names only when its manifest matches the files, and otherwise stops with the directory
named: it never falls back on its own to an older tag, which would silently undo training.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

from lshmoe_plugin.plugin_state import idle_keys

MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the directory or file."""


def save(engine, directory: str, step: int, client_state: dict) -> str:
    """Save tag ``step{step}`` on every rank; returns its directory once `latest` names it."""
    import torch.distributed as dist
    tag = f"step{step}"
    tag_dir = os.path.join(directory, tag)
    rank0 = dist.get_rank() == 0
    if rank0 and os.path.isdir(tag_dir):
        # Left by an interrupted save, or by a run that resumed from an earlier tag: a manifest there would vouch
        # for files the other ranks are about to overwrite.
        shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
    # save_checkpoint ends in a barrier, so every rank's files are on disk (a shared file system) here.
    if rank0:
        files = _files(tag_dir)
        _write_atomically(os.path.join(tag_dir, MANIFEST),
                          json.dumps({"tag": tag, "step": step, "world_size": dist.get_world_size(), "files": files},
                                     indent=1))
        _write_atomically(os.path.join(directory, LATEST), tag)
    return tag_dir


def resumable_tag(directory: str) -> str:
    """The tag `latest` names in `directory`, checked against its manifest; raises naming what is wrong."""
    latest = os.path.join(directory, LATEST)
    tag = latest_tag(directory)
    tag_dir = os.path.join(directory, tag)
    problem = incompleteness(tag_dir)
    if problem:
        complete = complete_tags(directory)
        hint = (f"complete checkpoints there: {', '.join(complete)}; to resume from one, write its tag into "
                f"{latest!r}") if complete else "no complete checkpoint is there"
        raise CheckpointError(f"--resume: checkpoint {tag_dir!r} (named by {latest!r}) is incomplete: {problem}; "
                              f"{hint}")
    return tag


def load(engine, directory: str) -> Tuple[str, dict]:
    """Load the tag `latest` names after checking it against its manifest; (tag directory, client_state)."""
    tag = resumable_tag(directory)
    tag_dir = os.path.join(directory, tag)
    try:
        path, client_state = engine.load_checkpoint(directory, tag=tag)
    except Exception as error:  # noqa: BLE001 - re-raised with the directory named
        raise CheckpointError(f"--resume: loading checkpoint {tag_dir!r} failed: {error}") from error
    if path is None:
        raise CheckpointError(f"--resume: DeepSpeed found no model states in {tag_dir!r}")
    return tag_dir, client_state


def latest_tag(directory: str) -> str:
    path = os.path.join(directory, LATEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume: no DeepSpeed checkpoint found in {directory!r} (no {LATEST!r} file)")
    with open(path) as f:
        tag = f.read().strip()
    if not tag:
        raise CheckpointError(f"--resume: {path!r} is empty; write the tag of a complete checkpoint into it")
    return tag


def incompleteness(tag_dir: str) -> Optional[str]:
    """Why `tag_dir` is not a complete checkpoint, or None when its files match its manifest."""
    if not os.path.isdir(tag_dir):
        return "the directory does not exist"
    manifest_path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        return (f"it has no {MANIFEST} (its save did not finish on every rank, or it was not written by "
                f"lshmoe_pretrain)")
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"{manifest_path} is unreadable ({error!r})"
    for name, size in sorted(files.items()):
        path = os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} holds {os.path.getsize(path)} bytes, its manifest says {size}"
    return None


def complete_tags(directory: str) -> List[str]:
    """Tags under `directory` whose files match their manifests, oldest step first."""
    if not os.path.isdir(directory):
        return []
    tags = [name for name in os.listdir(directory)
            if os.path.isdir(os.path.join(directory, name)) and incompleteness(os.path.join(directory, name)) is None]
    return sorted(tags, key=lambda t: (len(t), t))


def lsh_moe_resume_line(tag_dir: str, saved: Optional[dict], current: dict) -> str:
    """One line for the log: which lsh_moe settings the resumed run changes against the checkpoint's."""
    where = f"resume from {tag_dir}"
    if saved is None:
        return f"{where}: the checkpoint records no lsh_moe settings; now lsh_moe {json.dumps(current)}"
    idle = idle_keys(saved, current)
    changed = {key: (saved.get(key), value) for key, value in current.items()
               if key not in idle and saved.get(key) != value}
    if not changed:
        return f"{where}: lsh_moe settings unchanged"
    diff = ", ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in changed.items())
    projections = "; the hash projections come from the new settings" if current.get("enabled") else ""
    return (f"{where}: lsh_moe settings changed: {diff} (old {json.dumps(saved)}, new {json.dumps(current)})"
            f"{projections}")


def _files(tag_dir: str) -> Dict[str, int]:
    files = {}
    for root, _, names in os.walk(tag_dir):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, tag_dir)] = os.path.getsize(path)
    files.pop(MANIFEST, None)
    return files


def _write_atomically(path: str, text: str) -> None:
    # A crash mid-write must leave the old file or the new one, never a truncated one.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
