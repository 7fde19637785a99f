"""How a sampler runs its network: the faithful fp32 path by default, and named speed switches.

Every switch is off by default. `bench run --execution`, `bench sample --execution` and
`bench perf --execution` take a spec such as `bf16+skip-idle` (`plain`: none, `fast`: every switch
but cuda-graphs). A switch a sampler has no use for is dropped for that sampler, and every row
records the switches that took effect (`switches`) and says how it ran (`execution`).

  bf16              the network under bfloat16 autocast; draws are made from fp32 logits
  skip-idle         absorbing: at each step the denoiser runs only on the samples that unmask a
                    token; the others would throw their draws away (a step nobody unmasks in is free)
  head-where-drawn  absorbing: final norm, output head and draw only at the newly unmasked positions
  compile           torch.compile (inductor) of the network's pass; the cached autoregressive step
                    runs on a static key/value cache so that one graph serves every token
  cuda-graphs       compile with mode "reduce-overhead", which replays CUDA graphs (CUDA only)

Exactness (tests/test_execution.py): skip-idle and head-where-drawn only drop work whose result is
discarded, so they give the plain path's tokens; compile agrees with it to float rounding (same tokens
on the tests' seeds); bf16 changes the logits, so it is held to distributional agreement instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import BenchError

SWITCHES = ("bf16", "skip-idle", "head-where-drawn", "compile", "cuda-graphs")
PRESETS = {"plain": (), "fast": ("bf16", "skip-idle", "head-where-drawn", "compile")}


@dataclass(frozen=True)
class Execution:
    switches: tuple[str, ...] = ()  # in SWITCHES order

    @classmethod
    def parse(cls, spec: str | None) -> "Execution":
        """'plain', 'fast', or switches joined by '+' or ','."""
        spec = (spec or "plain").strip()
        names: set[str] = set()
        for part in spec.replace(",", "+").split("+"):
            part = part.strip()
            if part in PRESETS:
                names.update(PRESETS[part])
            elif part in SWITCHES:
                names.add(part)
            else:
                raise BenchError(f"execution {spec!r}: unknown switch {part!r}; expected 'plain', 'fast' "
                                 f"or switches joined by '+': {', '.join(SWITCHES)}")
        return cls(tuple(s for s in SWITCHES if s in names))

    def __contains__(self, switch: str) -> bool:
        return switch in self.switches

    def spec(self) -> str:
        return "+".join(self.switches) or "plain"

    def only(self, applicable: tuple[str, ...]) -> "Execution":
        """The switches a sampler uses: those of `applicable`."""
        return Execution(tuple(s for s in self.switches if s in applicable))

    @property
    def dtype(self) -> str:
        return "bfloat16" if "bf16" in self else "float32"

    @property
    def compiled(self) -> bool:
        return "compile" in self or "cuda-graphs" in self

    def check_device(self, device) -> None:
        if "cuda-graphs" in self and torch.device(device).type != "cuda":
            raise BenchError("execution switch 'cuda-graphs' needs a CUDA device")

    def autocast(self, device):
        if "bf16" not in self:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def compile(self, fn, dynamic: bool | None = None):
        """fn compiled as the switches say, or fn itself."""
        if not self.compiled:
            return fn
        mode = "reduce-overhead" if "cuda-graphs" in self else None
        return torch.compile(fn, mode=mode, dynamic=dynamic)


class Network:
    """A transformer run as an Execution says: under autocast, with its full-sequence pass compiled.

    hidden(idx) -> hidden states before the final norm; project(h) -> fp32 logits; net(idx) both.
    """

    def __init__(self, model, execution: Execution, dynamic: bool = False):
        self.model, self.execution = model, execution
        self.device = model.head.weight.device
        execution.check_device(self.device)
        # dynamic: the input's shape changes from call to call (skip-idle's batch, a growing prefix);
        # one graph with symbolic sizes instead of a recompilation per shape
        self._hidden = execution.compile(model.hidden, dynamic=True if dynamic else None)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        with self.execution.autocast(self.device):
            return self._hidden(idx)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.execution.autocast(self.device):
            return self.model.project(hidden).float()

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.project(self.hidden(idx))


def check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
