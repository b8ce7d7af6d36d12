"""Artifacts on disk: every artifact is a folder of ``*.safetensors`` + ``config.json``.

Writes go to a temporary sibling folder that is renamed into place, so an interrupted save never
leaves a half-written artifact; each weights file's sha256 is recorded in ``config.json`` and checked
on load, so a truncated or corrupted file is refused rather than silently used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from crosscoder.atomic import write_json_atomic
from crosscoder.config import ConfigError, CrosscoderConfig
from crosscoder.model import Crosscoder

WEIGHTS = "model.safetensors"
FORMAT = "crosscoder-folder/1"


class CorruptArtifactError(RuntimeError):
    """A file on disk does not match its recorded checksum (truncated or corrupted)."""


class ArtifactWriteError(OSError):
    """Writing an artifact failed (disk full, permissions); nothing was left behind."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_folder_atomically(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create folder ``path`` by calling ``fill(tmp_dir)`` then renaming tmp_dir into place.

    An existing folder at ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        try:
            fill(tmp)
        except OSError as err:
            why = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
            raise ArtifactWriteError(
                err.errno, f"could not write {path}: {why}; free space or choose another output "
                f"folder (nothing was written)"
            ) from err
        if path.exists():
            trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, trash / "old")
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed; one clear error if it cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create output folder {folder}: {err.strerror or err}; choose a writable folder"
        ) from err
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"output folder {folder} is not writable; choose a writable folder")
    return folder


def save_tensors_checked(tensors: dict[str, torch.Tensor], folder: Path, name: str) -> str:
    """Save tensors to folder/name and return the file's sha256."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / name))
    return sha256_file(folder / name)


def load_tensors_checked(folder: Path, name: str, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    path = folder / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; the artifact folder is incomplete")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CorruptArtifactError(
            f"{path} does not match the sha256 recorded in its config.json (truncated or "
            f"corrupted); delete the folder and re-create it"
        )
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise CorruptArtifactError(f"{path} is not a readable safetensors file: {err}") from err


def save_crosscoder(
    model: Crosscoder,
    path: str | os.PathLike,
    *,
    extra: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` as a folder: model.safetensors, config.json (+ metrics.json)."""

    def fill(tmp: Path) -> None:
        digest = save_tensors_checked(dict(model.state_dict()), tmp, WEIGHTS)
        cfg = {
            "format": FORMAT,
            "model": model.cfg.to_dict(),
            "files": {WEIGHTS: digest},
            **({"extra": extra} if extra else {}),
        }
        write_json_atomic(tmp / "config.json", cfg)
        if metrics is not None:
            write_json_atomic(tmp / "metrics.json", metrics)

    return write_folder_atomically(path, fill)


def read_metrics(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/metrics.json`` of an artifact ({} when it has none yet)."""
    path = Path(folder) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def update_metrics(folder: str | os.PathLike, new: dict[str, Any]) -> dict[str, Any]:
    """Merge ``new`` into ``folder/metrics.json`` (atomic rewrite) and return the result."""
    path = Path(folder) / "metrics.json"
    metrics = read_metrics(folder)
    metrics.update(new)
    write_json_atomic(path, metrics)
    return metrics


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: {path} is not a crosscoder folder")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    if cfg.get("format") != FORMAT:
        raise ConfigError(
            f"{cfg_path} has format {cfg.get('format')!r}, expected {FORMAT!r}; for published "
            f"checkpoints use crosscoder.formats.load_kissane / load_dictionary_learning"
        )
    return cfg


def load_crosscoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Crosscoder:
    """Load a folder written by ``save_crosscoder`` (checksum verified)."""
    path = Path(path)
    cfg = read_config(path)
    model = Crosscoder(CrosscoderConfig.from_dict(cfg["model"]))
    state = load_tensors_checked(path, WEIGHTS, cfg.get("files", {}).get(WEIGHTS))
    model.load_state_dict(state)
    return model.to(map_location)
