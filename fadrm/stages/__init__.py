"""The stages of a run, one module each: squeeze -> select -> recover -> relabel -> evaluate.

:class:`~fadrm.plan.RunPlan` builds them with their content keys; :mod:`fadrm.stages.base`
says what a stage is.
"""

from fadrm.stages.base import Stage, WorkerContext, unit_seed
from fadrm.stages.evaluate import EvaluateStage
from fadrm.stages.recover import RecoverStage
from fadrm.stages.relabel import RelabelStage
from fadrm.stages.select import SelectStage
from fadrm.stages.squeeze import SqueezeStage

__all__ = ["Stage", "WorkerContext", "unit_seed", "SqueezeStage", "SelectStage",
           "RecoverStage", "RelabelStage", "EvaluateStage"]
