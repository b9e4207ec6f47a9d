"""The job's global model: its architecture, the method that deploys it, its current state.

Every local method keeps the same state keys (steps are frozen or calibrated, not learned), so
devices on different methods average into one model. The global model is prepared, evaluated
and exported through one method: a uniform fleet's own (its QAT steps are the grid the weights
were trained onto), a mixed or FedMPQ fleet's PTQ, whose calibrated steps fit any of them.
"""

from __future__ import annotations

import torch
from torch import nn

from bitfleet.assignment import Assignment
from bitfleet.data import DatasetSpec
from bitfleet.models import create_model_for
from bitfleet.quant import LocalMethod
from bitfleet.quant.modules import BitMap

from .config import JobConfig

StateDict = dict[str, torch.Tensor]


def job_method(cfg: JobConfig) -> LocalMethod:
    """The method that prepares, evaluates and deploys the job's global model."""
    a = cfg.allocation
    if a.mode == "fixed" and a.strategy != "mpq":
        uniform = Assignment(a.strategy, a.bits, bit_set=tuple(a.bit_set) or None, step=a.step)
        return uniform.method()
    return Assignment("ptq", a.bits).method()


class GlobalModel:
    """The model the rounds improve: `state` is the current global state, `module` a live copy
    of it (FedMPQ reads its bit planes)."""

    def __init__(self, cfg: JobConfig, spec: DatasetSpec) -> None:
        self.cfg = cfg
        self.spec = spec
        self.method = job_method(cfg)
        self.module = self.build(init=True)
        self.state: StateDict = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def build(self, init: bool = False) -> nn.Module:
        """The job's model, prepared by its method; `init` seeds its first weights.

        Only the initial model draws from torch's global generator: evaluation and export
        models are loaded with a state anyway, and reseeding from their threads would change
        what in-process agents (the simulator's) draw at the same moment.
        """
        model = create_model_for(self.cfg.model.name, self.spec)
        if init:
            torch.manual_seed(self.cfg.job.seed)
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        return self.method.prepare(model)

    def load(self, state: StateDict) -> None:
        """Make `state` the global model."""
        self.state = {k: v.clone() for k, v in state.items()}
        self.module.load_state_dict(self.state)

    def deployed(self, state: StateDict, bits: BitMap) -> nn.Module:
        """A fresh model holding `state`, deployed at `bits` (one width, or per layer)."""
        model = self.build()
        model.load_state_dict(state)
        return self.method.deploy(model, bits)

    @property
    def payload_bytes(self) -> int:
        """Bytes of the state as tensors: what a task or an update carries, about."""
        return sum(v.numel() * v.element_size() for v in self.state.values())
