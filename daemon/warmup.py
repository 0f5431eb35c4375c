"""Warm-up and smoke test of a freshly loaded version, before it may serve.

The first run pays a runtime's lazy allocations, so it should not be a client's. What that run uses, and what its
failure means, depends on what the version brings: a packed smoke test is a hard gate (an updater acts on
:class:`~daemon.errors.SmokeTestFailed`); operator-given inputs are declared valid; a guess is only a guess.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from adapters import AdapterError, Session
from adapters.base import TensorSpec
from daemon.config import WarmupInputs
from daemon.errors import ConfigError, SmokeTestFailed

log = logging.getLogger("inferd.models")

SMOKE_RTOL = 1e-4
SMOKE_ATOL = 1e-5


def warm_up(
    session: Session,
    reference: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None,
    warmup: WarmupInputs | None,
    label: str,
) -> None:
    """The first run pays the runtime's lazy allocations. Which inputs, and what a failure means:

    - a packed smoke test is a gate: the model must reproduce its reference, or the version fails to load;
    - inputs the operator configured (``warmup``) are declared valid, so their failure fails the load too;
    - otherwise the inputs are a guess (zeros, every dynamic dimension 1, wherever the batch is), which a good model
      may refuse (a reflect Pad needs more than one sample): a WARNING names the shapes tried and the model serves;
      unless every dimension is fixed, when the guess has the only shapes a request could have: then it fails the load.
    """
    if reference is not None:
        _smoke_test(session, reference, label)
    if warmup is not None:
        feed = warmup_feed(session.inputs, warmup, label)
        try:
            session.run(feed)
        except AdapterError as exc:
            raise AdapterError(f"{label}: warm-up with the configured inputs ({_shapes(feed)}) failed: {exc}") from exc
        log.info("model %s warmed up with the configured inputs (%s)", label, _shapes(feed),
                 extra={"event_kind": "warmed_up", "model": label})
        return
    if reference is not None:
        return
    feed = {s.name: np.zeros(tuple(1 if d < 0 else d for d in s.shape), dtype=s.dtype) for s in session.inputs}
    try:
        session.run(feed)
    except AdapterError as exc:
        if all(s.shape and min(s.shape) >= 0 for s in session.inputs):
            # every dimension is fixed: these are the only shapes a request can have, so the model cannot serve
            raise AdapterError(f"{label}: the model fails on inputs of the only shapes it accepts "
                               f"({_shapes(feed)}, zero-filled): {exc}") from exc
        log.warning(
            "model %s: the warm-up with guessed inputs (%s, zero-filled) failed; the model serves anyway (give "
            "'warmup' inputs in its config, or pack a smoke test, for a real warm-up): %s",
            label, _shapes(feed), exc, extra={"event_kind": "warmup_failed", "model": label},
        )


def _smoke_test(session: Session, reference: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], label: str) -> None:
    inputs, expected = reference
    try:
        results = session.run(inputs)
    except AdapterError as exc:
        raise SmokeTestFailed(
            f"{label}: smoke test failed: the runtime refused the packed reference inputs: {exc}") from exc
    for name, want in expected.items():
        got = results.get(name)
        if got is None or got.shape != want.shape or got.dtype != want.dtype:
            raise SmokeTestFailed(
                f"{label}: smoke test failed: output {name!r} missing, or of the wrong shape or dtype")
        if want.dtype.kind in "fc":
            ok = np.allclose(got, want, rtol=SMOKE_RTOL, atol=SMOKE_ATOL)
        else:
            ok = np.array_equal(got, want)
        if not ok:
            raise SmokeTestFailed(f"{label}: smoke test failed: output {name!r} differs from the packed reference")


def warmup_feed(specs: list[TensorSpec], warmup: WarmupInputs, label: str) -> dict[str, np.ndarray]:
    """The configured warm-up inputs, checked against the model's inputs so a mistake names itself before the
    runtime sees it. Shapes are zero-filled in each input's datatype; a .npz file must hold exactly the inputs."""
    if isinstance(warmup, Path):
        try:
            with np.load(warmup, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model {label}: cannot read the warm-up file {warmup}: {exc}") from None
    else:
        arrays = {}
        for name, shape in warmup.items():
            spec = next((s for s in specs if s.name == name), None)
            arrays[name] = np.zeros(shape, dtype=spec.dtype if spec is not None else np.float32)
    where = f"model {label}: warmup"
    names = {s.name for s in specs}
    unknown = sorted(set(arrays) - names)
    missing = [s.name for s in specs if s.name not in arrays]
    if unknown or missing:
        problems = ([f"{', '.join(map(repr, unknown))} not among them"] if unknown else []) + (
            [f"{', '.join(map(repr, missing))} missing"] if missing else [])
        raise ConfigError(f"{where}: give every input of the model ({', '.join(sorted(names))}): {'; '.join(problems)}")
    for spec in specs:
        arr = arrays[spec.name]
        if arr.dtype != spec.dtype:
            raise ConfigError(f"{where}: input {spec.name!r} is {arr.dtype}; the model takes {spec.dtype}")
        fits = len(arr.shape) == len(spec.shape) and all(d < 0 or d == n for d, n in zip(spec.shape, arr.shape))
        if spec.shape and not fits:  # () is also how an input of unknown rank is described: the runtime judges
            raise ConfigError(f"{where}: input {spec.name!r} has shape {list(arr.shape)}; the model takes "
                              f"{list(spec.shape)} (-1: any size)")
    return {s.name: arrays[s.name] for s in specs}


def _shapes(feed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {list(arr.shape)}" for name, arr in feed.items())
