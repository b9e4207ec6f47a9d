"""Round checkpoints: the global model and the server optimiser's state, in safetensors.

A coordinator killed at any instant must come back to the last finished round, so a checkpoint
is written to a temporary file in the same directory, fsynced and renamed into place, and only
then does `checkpoints/LATEST` (rewritten the same way) name it. A write that fails leaves the
previous checkpoint and `LATEST` untouched. safetensors, never pickle: a checkpoint is data a
coordinator may load from a shared disk, and loading it must not run code.

Layout of `<state_dir>/checkpoints/round-00007.safetensors`: model tensors under `model.`,
server-optimiser tensors under `server.`, metadata `{"round": "7"}`. `round` is the number of
the round whose result the model is.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "CHECKPOINT_DIR",
    "KEEP",
    "LATEST",
    "CheckpointError",
    "checkpoint_path",
    "load_latest_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "LATEST"
KEEP = 3
"""Checkpoints kept: the latest and two before it, so one corrupt file still leaves a fallback."""

_MODEL = "model."
_SERVER = "server."
_FILE_RE = re.compile(r"round-(\d{5,})\.safetensors")

StateDict = dict[str, torch.Tensor]


class CheckpointError(OSError):
    """A checkpoint could not be written, or none of the existing ones could be read."""


def checkpoint_path(state_dir: str | Path, round: int) -> Path:
    return Path(state_dir) / CHECKPOINT_DIR / f"round-{round:05d}.safetensors"


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; best effort where directories cannot be opened (Windows)."""
    if os.name != "posix":
        return
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)`, fsync, then rename over `path`; no temp file survives."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _flatten(
    model_state: Mapping[str, torch.Tensor], strategy_state: Mapping[str, torch.Tensor]
) -> StateDict:
    tensors: StateDict = {}
    for prefix, state in ((_MODEL, model_state), (_SERVER, strategy_state)):
        for k, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"checkpoint entry {prefix}{k}: not a tensor ({type(t).__name__})")
            # A private contiguous CPU copy: safetensors refuses tensors that share storage.
            tensors[prefix + k] = t.detach().to("cpu").clone().contiguous()
    return tensors


def save_checkpoint(
    state_dir: str | Path,
    round: int,
    model_state: Mapping[str, torch.Tensor],
    strategy_state: Mapping[str, torch.Tensor],
    *,
    keep: int = KEEP,
) -> Path:
    """Write round `round`'s checkpoint atomically, point LATEST at it, keep the last `keep`."""
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be an int >= 0, got {round!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    tensors = _flatten(model_state, strategy_state)
    target = checkpoint_path(state_dir, round)
    ckdir = target.parent
    try:
        ckdir.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata={"round": str(round)}))
        _atomic_write(ckdir / LATEST, lambda tmp: Path(tmp).write_text(target.name + "\n"))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(
            f"cannot write the checkpoint of round {round} to {target}: {e}; "
            "the previous checkpoint is unchanged"
        ) from e
    _prune(ckdir, round, keep)
    return target


def _listing(ckdir: Path) -> dict[int, Path]:
    out = {}
    for p in ckdir.iterdir():
        m = _FILE_RE.fullmatch(p.name)
        if m and p.is_file():
            out[int(m.group(1))] = p
    return out


def _prune(ckdir: Path, latest: int, keep: int) -> None:
    """Drop checkpoints beyond the last `keep` up to `latest`, newer abandoned ones, temp files.

    Failing to delete is only worth a warning: the checkpoint itself is safely written.
    """
    files = _listing(ckdir)
    kept = sorted(r for r in files if r <= latest)[-keep:]
    doomed = [p for r, p in files.items() if r not in kept]
    doomed += [p for p in ckdir.glob(".*.tmp") if p.is_file()]
    for p in doomed:
        try:
            p.unlink()
        except OSError as e:
            log.warning("could not remove old checkpoint file %s: %s", p, e)


def _read(path: Path, round: int) -> tuple[int, StateDict, StateDict]:
    model: StateDict = {}
    server: StateDict = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("round") != str(round):
            raise ValueError(f"metadata says round {meta.get('round')!r}, file name says {round}")
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if name.startswith(_MODEL):
                model[name[len(_MODEL) :]] = f.get_tensor(name)
            elif name.startswith(_SERVER):
                server[name[len(_SERVER) :]] = f.get_tensor(name)
            else:
                raise ValueError(f"unexpected tensor {name!r} (neither model. nor server.)")
    return round, model, server


def load_latest_checkpoint(
    state_dir: str | Path,
) -> tuple[int, StateDict, StateDict] | None:
    """(round, model_state, strategy_state) of the newest readable checkpoint, or None.

    The file LATEST names comes first; if it is unreadable, older ones are tried in turn with
    a warning (never a newer one: a file newer than LATEST was not committed). None when no
    checkpoint exists; CheckpointError when checkpoints exist but none can be read, rather
    than silently starting the job over.
    """
    ckdir = Path(state_dir) / CHECKPOINT_DIR
    if not ckdir.is_dir():
        return None
    files = _listing(ckdir)
    latest_round: int | None = None
    latest_file = ckdir / LATEST
    if latest_file.exists():
        try:
            name = latest_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            name = ""
            log.warning("cannot read %s (%s); using the newest checkpoint file", latest_file, e)
        m = _FILE_RE.fullmatch(name)
        if m:
            latest_round = int(m.group(1))
        elif name:
            log.warning("%s names %r, not a checkpoint; using the newest file", latest_file, name)
    elif files:
        log.warning("%s is missing; using the newest checkpoint file", latest_file)
    if latest_round is not None and latest_round not in files:
        log.warning("%s names round %d, whose file is missing", latest_file, latest_round)
    candidates = sorted(
        (r for r in files if latest_round is None or r <= latest_round), reverse=True
    )
    if not candidates:
        if latest_round is None:
            return None
        raise CheckpointError(f"{latest_file} names round {latest_round}, but no checkpoint exists")
    problems = []
    for r in candidates:
        try:
            return _read(files[r], r)
        except (OSError, SafetensorError, ValueError) as e:
            problems.append(f"{files[r].name}: {e}")
            log.warning("checkpoint %s is unreadable (%s); trying the one before", files[r], e)
    raise CheckpointError(f"no readable checkpoint in {ckdir}: " + "; ".join(problems))
