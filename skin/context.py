"""What every role is handed: one :class:`RoleContext`, built once by the CLI.

A role (stage, chief, worker, retrain, and the roles ``skin run`` starts as ``skin``
processes) reads its experiment, its runtime, its storage, its metric hooks and its
hypermodel from here, instead of each building its own. Tests and benchmarks build one
with a stand-in hypermodel (``hypermodel_factory``) or no metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `skin --help` imports this module: nothing beyond the standard library
    from skin.infra.config import Experiment
    from skin.infra.runtime import Runtime


def skin_hypermodel(ctx: RoleContext) -> Any:
    """The skin CNN's search space, its backbone weights cached in the role's work dir: the
    one place a role builds ``SkinHyperModel``."""
    from skin.model.hypermodel import (
        SkinHyperModel,  # keras-tuner and TensorFlow: only roles that train
    )

    return SkinHyperModel(ctx.exp, storage=ctx.storage,
                          cache_dir=Path(ctx.runtime.work_dir) / "backbone")


@dataclass
class RoleContext:
    """One role's world. ``metrics``: the role's hooks (``skin.metrics.server.role_metrics``; None:
    off). ``hypermodel_factory(ctx)`` builds the hypermodel on the first
    :meth:`hypermodel` call (default :func:`skin_hypermodel`), so a role that does not need
    one (a chief resuming a saved search) never loads TensorFlow for it."""

    exp: Experiment
    runtime: Runtime
    storage: Any  # skin.infra.storage.Storage, or a stand-in with its interface
    metrics: Any = None
    hypermodel_factory: Callable[[RoleContext], Any] = skin_hypermodel
    _hypermodel: Any = field(default=None, init=False, repr=False)

    def hypermodel(self) -> Any:
        """The role's keras-tuner HyperModel, built once."""
        if self._hypermodel is None:
            self._hypermodel = self.hypermodel_factory(self)
        return self._hypermodel

    @classmethod
    def with_hypermodel(cls, exp: Experiment, runtime: Runtime, storage: Any, hypermodel: Any,
                        metrics: Any = None) -> RoleContext:
        """A context whose hypermodel is ``hypermodel`` (tests, benchmarks, a stand-in)."""
        return cls(exp, runtime, storage, metrics, hypermodel_factory=lambda _ctx: hypermodel)
