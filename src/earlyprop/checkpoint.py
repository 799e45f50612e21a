"""Crash-safe checkpoints: tensors in safetensors, everything else in JSON, no pickle anywhere.

A checkpoint is two files, ``ckpt-NNNNNNNN.safetensors`` and ``ckpt-NNNNNNNN.json``. Each is
written to a temporary file, fsynced, then renamed into place, and the JSON goes last carrying
the SHA-256 of the tensor file: a checkpoint exists only once its JSON does, and a crash at any
moment leaves the previous one intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

NAME = re.compile(r"^ckpt-(\d{8})\.json$")
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or belongs to another run configuration."""


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    if sys.platform.startswith("win"):
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int = 3) -> Path:
    """Write checkpoint ``step`` into ``folder`` and keep only the newest ``keep`` ones."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    stem = f"ckpt-{step:08d}"
    atomic_write(folder / f"{stem}.safetensors", payload)
    record = {"format": FORMAT, "step": step, "sha256": hashlib.sha256(payload).hexdigest(), "meta": meta}
    atomic_write(folder / f"{stem}.json", json.dumps(record, indent=1).encode())
    _prune(folder, keep)
    return folder / f"{stem}.json"


def _prune(folder: Path, keep: int) -> None:
    for path in checkpoint_paths(folder)[keep:]:
        path.with_suffix(".safetensors").unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def checkpoint_paths(folder: Path) -> list[Path]:
    """Checkpoint JSON files in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if NAME.match(p.name)), reverse=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint (given by its JSON file); CheckpointError if anything is off."""
    try:
        record = json.loads(path.read_text())
        meta, digest = record["meta"], record["sha256"]
        if record.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path} has format {record.get('format')}, expected {FORMAT}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({type(exc).__name__})") from None
    tensor_path = path.with_suffix(".safetensors")
    try:
        payload = tensor_path.read_bytes()
    except OSError:
        raise CheckpointError(f"checkpoint tensors {tensor_path} are missing") from None
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint tensors {tensor_path} are corrupt or truncated (checksum mismatch)")
    try:
        tensors = load_safetensors(payload)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"checkpoint tensors {tensor_path} cannot be read: {exc}") from None
    return Checkpoint(tensors, meta, path)


def latest_checkpoint(folder: Path, warn=None) -> Checkpoint | None:
    """The newest valid checkpoint in ``folder``; None if there is none at all.

    Corrupt newer ones are skipped (and reported through ``warn``); if checkpoints exist but none
    is valid, CheckpointError names the newest one's problem.
    """
    errors: list[CheckpointError] = []
    for path in checkpoint_paths(folder):
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as exc:
            errors.append(exc)
            continue
        for exc in errors if warn is not None else ():
            warn(f"skipping {exc}")
        return checkpoint
    if errors:
        raise CheckpointError(f"no valid checkpoint in {folder}: {errors[0]}")
    return None


def describe_mismatch(expected: dict[str, Any], found: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """'key: found X, configured Y; ...' for the keys whose values differ, else None."""
    diffs = [f"{k}: checkpoint has {found.get(k)!r}, configured {expected.get(k)!r}" for k in keys
             if found.get(k) != expected.get(k)]
    return "; ".join(diffs) or None
