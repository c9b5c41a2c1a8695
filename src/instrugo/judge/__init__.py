"""The gold judge: verifiable constraint kinds, their verifiers, and the topicality/degeneration checks.

    from instrugo.judge import gold_judge, check_constraint, CONSTRAINT_KINDS
    gold_judge(record, response).score     # in [0, 1]

Imports nothing from the training stages; later stages use it to simulate labelers and to evaluate.
"""

from instrugo.judge.constraints import CONSTRAINT_KINDS, ConstraintKind, check_constraint, compatible
from instrugo.judge.gold import GoldVerdict, gold_judge

__all__ = ["CONSTRAINT_KINDS", "ConstraintKind", "GoldVerdict", "check_constraint", "compatible", "gold_judge"]
