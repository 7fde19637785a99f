"""Every sampler, registered in one explicit place: name -> class (bench.samplers.base.Sampler).

bench.toml, the command line and `bench perf` name samplers from this table; `make_sampler` builds
one from a dataset's loaded priors and tokenizer, and says plainly what is missing.
"""
from __future__ import annotations

from baselines.autoregressive import AutoregressiveRecomputeSampler, AutoregressiveSampler
from baselines.maskgit import MaskGITSampler
from baselines.taming import TamingRecomputeSampler, TamingSampler

from ..errors import BenchError
from ..execution import Execution
from .absorbing import AbsorbingSampler
from .base import Sampler
from .random_codes import RandomCodesSampler

SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (
    AbsorbingSampler,                 # the paper's
    RandomCodesSampler,               # control: a ceiling for FID
    AutoregressiveSampler,            # raster order, key/value cache
    AutoregressiveRecomputeSampler,   # the official baseline's execution
    MaskGITSampler,                   # confidence-ordered decoding with the absorbing denoiser
    TamingSampler,                    # a Taming Transformers release, with its own first stage
    TamingRecomputeSampler,           # the same without the cache
)}


def sampler_class(name: str) -> type[Sampler]:
    if name not in SAMPLERS:
        raise BenchError(f"unknown sampler {name!r}; registered: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def make_sampler(name: str, priors: dict, tokenizer=None, execution: Execution | None = None) -> Sampler:
    """The sampler `name` on its prior (from `priors`: kind -> bench.loading.Prior), emitting the codes
    of the prior's own tokenizer where it brings one, else of `tokenizer` (the dataset's)."""
    cls = sampler_class(name)
    if cls.prior_kind is None:
        return cls(None, tokenizer, execution)
    prior = priors.get(cls.prior_kind)
    if prior is None:
        raise BenchError(f"sampler {name!r} needs a {cls.prior_kind} prior; set priors.{cls.prior_kind} "
                         f"for this dataset in bench.toml")
    tokenizer = prior.tokenizer or tokenizer
    if tokenizer is not None:
        prior.check_fits(tokenizer)
    return cls(prior.network, tokenizer, execution)
