"""One run, every analysis: the evidence behind ``forgetdiag report``.

A run description (:mod:`forgetdiag.runfile`) names the checkpoints and probes. The report runs:

* ``recover`` over the run's checkpoints (the paper's Fig. 2a curve), headed by the named
  after-checkpoint's verdict;
* ``angles`` between the early and the late update of the landscape triple (origin, x end,
  y end): the paper finds them nearly orthogonal in the bottom layers;
* ``landscape`` in the plane of those two updates, with the run's trajectory;
* ``features`` between the three checkpoints of the triple, on the old task's prompts.

An analysis whose inputs are missing is skipped with a note, never a crash; each is timed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from forgetdiag._version import __version__
from forgetdiag.analyses.recovery import recover
from forgetdiag.analyses.recovery_result import RecoveryResult, summary_text
from forgetdiag.checkpoints import fingerprint, resolve_checkpoints
from forgetdiag.models import preload_classes
from forgetdiag.probes import Probe, load_probe, split_probe
from forgetdiag.results import Result
from forgetdiag.runfile import RunSpec, landscape_triple
from forgetdiag.runtime import ProgressFn, Runtime, Warn, torch_threads
from forgetdiag.settings import ReportSettings

ADVICE = {
    "spurious": "Cheap to fix: a few old-task examples re-align the model; during the next "
    "task, freeze the input embedding and the bottom layers that hold the change "
    "(`forgetdiag advise RUN` measures how many and prints the code).",
    "real": "The old knowledge itself is gone: replay old-task data or retrain; re-alignment "
    "alone will not bring it back.",
    "mixed": "Part alignment, part knowledge: re-align with a few examples, and replay "
    "old-task data for what does not come back.",
    "none": "No significant forgetting on the probe: nothing to re-align or replay.",
}


class _Stopped(Exception):
    """Raised inside the side thread when the main thread failed: stop early."""


@dataclass(frozen=True)
class ReportResult(Result):
    """Every analysis of one run (None where skipped), with provenance.

    ``timings`` holds each analysis' seconds and ``total``, the whole report's wall time (less
    than their sum when analyses overlap).
    """

    analysis = "report"
    spec: RunSpec
    recovery: RecoveryResult | None
    angles: Any
    landscape: Any
    features: Any
    skipped: dict[str, str]
    fingerprints: tuple[dict, ...]
    settings: ReportSettings
    command: str = ""
    version: str = __version__
    warnings: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def verdict(self) -> str | None:
        return self.recovery.verdict if self.recovery is not None else None

    def headline(self) -> str:
        """The verdict in plain words, with the numbers behind it."""
        if self.recovery is None:
            return f"No verdict: the recovery probe was skipped ({self.skipped.get('recover', '')})."
        text = summary_text(self.recovery)
        return text[0].upper() + text[1:] + "."

    def summary(self) -> str:
        return self.headline()

    def advice(self) -> str:
        return ADVICE.get(self.verdict or "", "")

    def body(self) -> dict:
        part = lambda r: r.to_dict() if r is not None else None
        return {
            "run": {
                "name": self.spec.name,
                "description": self.spec.description,
                "file": str(self.spec.path),
                "expected_verdict": self.spec.expected_verdict,
            },
            "verdict": self.verdict,
            "advice": self.advice(),
            "recover": part(self.recovery),
            "angles": part(self.angles),
            "landscape": part(self.landscape),
            "features": part(self.features),
            "skipped": self.skipped,
            "fingerprints": list(self.fingerprints),
            "command": self.command,
            "forgetdiag_version": self.version,
        }


def _sample(probe: Probe, n: int, seed: int) -> Probe:
    """At most ``n`` rows of whole groups, a seeded sample (the whole probe if smaller)."""
    if len(probe) <= n:
        return probe
    return replace(split_probe(probe, n_recovery=0, n_eval=n, seed=seed)[1], name=probe.name)


def build_report(
    spec: RunSpec,
    *,
    settings: ReportSettings = ReportSettings(),
    runtime: Runtime = Runtime(),
    command: str = "",
    progress: ProgressFn | None = None,
    warn: Warn | None = None,
) -> ReportResult:
    """Run every analysis whose inputs ``spec`` provides.

    Args:
        spec: the run (from :func:`forgetdiag.runfile.load_run`, or built by hand).
        settings: budgets and sizes (defaults keep a sample report under two minutes on CPU).
        runtime: how models run.
        command: the command line, recorded for provenance.
    """
    warn = warn or (lambda message: None)
    skipped, timings, notes = {}, {}, []
    for name in settings.skip:
        skipped[name] = "skipped on request"
    run = resolve_checkpoints(spec.run, runtime) if spec.run is not None else []
    probes = {k: load_probe(p, fields=settings.probe_fields) for k, p in spec.probes.items()}
    old = probes.get("old")
    triple = landscape_triple(spec, run, runtime)
    results: dict[str, Any] = {}

    def attempt(name: str, missing: str | None, work: Callable[[], Any]) -> None:
        if name in skipped:
            return
        if missing:
            skipped[name] = missing
            warn(f"report: {name} skipped: {missing}")
            return
        start = time.perf_counter()
        results[name] = work()
        timings[name] = time.perf_counter() - start

    before_path = spec.before.resolve() if spec.before is not None else None
    afters = [c for c in run if c.path.resolve() != before_path]  # before vs itself tells nothing
    if spec.after is not None and spec.after.resolve() not in {c.path.resolve() for c in run}:
        afters.append(spec.after)
    no_triple = triple if isinstance(triple, str) else None
    surface_probes = [
        _sample(p, settings.landscape_items, settings.seed) for k, p in probes.items() if k in ("old", "new")
    ]

    def run_recover() -> None:
        attempt(
            "recover",
            _missing_recover(spec, old),
            lambda: recover(
                spec.before,
                afters,
                old,
                control=spec.control,
                recovery_probe=probes.get("recovery"),
                at=spec.after,
                settings=settings.recovery,
                runtime=runtime,
                progress=progress,
                warn=warn,
            ),
        )

    def run_others(progress: ProgressFn | None) -> None:
        attempt("angles", no_triple, lambda: _angles(triple, settings, runtime, progress))
        attempt(
            "landscape",
            no_triple or (None if surface_probes else "no probe in the run file"),
            lambda: _landscape(triple, surface_probes, run, settings, runtime, progress, warn),
        )
        attempt(
            "features",
            no_triple or (None if old else "no old-task probe ([probes] old)"),
            lambda: _features(
                triple, _sample(old, settings.feature_items, settings.seed), settings, runtime, progress, warn
            ),
        )

    start = time.perf_counter()
    if settings.overlap and _can_overlap(run or triple, runtime) and "recover" not in settings.skip:
        preload_classes((run or triple)[0])
        _overlapped(run_recover, run_others, progress)
    else:
        run_recover()
        run_others(progress)
    wall = time.perf_counter() - start
    everything = {c.path.resolve(): c for c in [*run, *(triple if not no_triple else [])]}
    for p in (spec.before, spec.after, spec.control):
        if p is not None and p.resolve() not in everything:
            everything.update({c.path.resolve(): c for c in resolve_checkpoints(p, runtime)})
    return ReportResult(
        spec,
        results.get("recover"),
        results.get("angles"),
        results.get("landscape"),
        results.get("features"),
        skipped,
        tuple(fingerprint(c) for c in everything.values()),
        settings,
        command=command,
        warnings=tuple(notes),
        timings={**timings, "total": wall},
    )


def _can_overlap(checkpoints, runtime: Runtime) -> bool:
    """Two analyses at once pay only on a CPU with spare cores, for one-thread models.

    Only in float32: loading a model in another dtype sets torch's process-wide default dtype
    while it builds, which the other thread's new tensors would pick up.
    """
    if isinstance(checkpoints, str) or not checkpoints or (os.cpu_count() or 1) < 2:
        return False
    return (
        runtime.torch_device.type == "cpu"
        and runtime.threads in (None, 1)
        and runtime.dtype == "float32"
        and runtime.auto_threads(checkpoints[0].n_params) == 1
    )


def _overlapped(
    main: Callable[[], None], side: Callable[[ProgressFn | None], None], progress: ProgressFn | None
) -> None:
    """``main()`` here and ``side(progress)`` in a second thread (torch ops release the GIL).

    If ``main`` fails, the side thread stops at its next progress call; its errors re-raise here.
    """
    stop = threading.Event()

    def checked(description: str, done: int, total: int) -> None:
        if stop.is_set():
            raise _Stopped
        if progress is not None:
            progress(description, done, total)

    def guarded() -> None:
        with torch_threads(1):  # a new thread starts with torch's default thread count
            side(checked)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgetdiag-report") as pool:
        future = pool.submit(guarded)
        try:
            main()
        except BaseException:
            stop.set()
            raise
        future.result()


def _missing_recover(spec: RunSpec, old: Probe | None) -> str | None:
    if old is None:
        return "no old-task probe ([probes] old in the run file, or --probe)"
    if spec.before is None or (spec.after is None and spec.run is None):
        return "needs a before checkpoint and an after checkpoint or run"
    return None


def _angles(triple, settings: ReportSettings, runtime: Runtime, progress):
    from forgetdiag.analyses.angles import AngleSettings, compute_angles

    return compute_angles(triple, settings=AngleSettings(rank=settings.rank), runtime=runtime, progress=progress)


def _landscape(triple, probes, run, settings: ReportSettings, runtime: Runtime, progress, warn):
    from forgetdiag.analyses.landscape import LandscapeSettings, landscape

    grid = LandscapeSettings(grid=(settings.grid, settings.grid))
    return landscape(*triple, probes, trajectory=run, settings=grid, runtime=runtime, progress=progress, warn=warn)


def _features(triple, probe, settings: ReportSettings, runtime: Runtime, progress, warn):
    from forgetdiag.analyses.features import FeatureSettings, feature_shifts

    return feature_shifts(
        triple, probe, settings=FeatureSettings(seed=settings.seed), runtime=runtime, progress=progress, warn=warn
    )
