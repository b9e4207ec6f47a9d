"""A small simulate experiment file for the e2e tests of the simulator's parts: Pi 4 and Pi 5
boards on tiny data, one fixed method per entry of `methods`, deployed at 2 bits."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def tiny_experiment(
    data: str | Path,
    *,
    per_board: int,
    rounds: int,
    local_epochs: float,
    methods: Mapping[str, str],
) -> str:
    """The TOML text; `methods` maps a method's name to its fixed strategy."""
    fixed = "\n".join(
        f'[methods.{name}]\nallocation = {{ mode = "fixed", strategy = "{strategy}" }}'
        for name, strategy in methods.items()
    )
    return f"""
[simulate]
name = "tiny"
eval_bits = [32, 2]
devices = [{{ board = "rpi4", count = {per_board} }}, {{ board = "rpi5", count = {per_board} }}]
[data]
data_dir = "{data}"
[training]
rounds = {rounds}
local_epochs = {local_epochs}
batch_size = 32
[rounds]
quorum = 1.0
deadline_s = 60.0
register_timeout_s = 30.0
[deploy]
bits = [2]
[allocation]
bits = 2
{fixed}
"""
