"""Sample checkpoints whose forgetting is known: a synthetic biography world, the builder that
trains tiny runs on it (one forgets spuriously, one for real), and the measurement of the
truths they carry. ``forgetdiag samples build --out DIR`` rebuilds them from seeds; the
repository ships the result as ``sample_checkpoints/``.
"""

from forgetdiag.samples.build import SampleConfig, build_samples
from forgetdiag.samples.measure import Truth, measure_samples
from forgetdiag.samples.world import World, make_world

__all__ = ["SampleConfig", "build_samples", "Truth", "measure_samples", "World", "make_world"]
