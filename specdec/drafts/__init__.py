"""Proposers: things that guess the target's next K tokens. All go through one interface (`Proposer`)."""

from .base import Proposer
from .model_draft import DraftModelProposer
from .mtp import MTPProposer
from .ngram import NgramProposer

__all__ = ["Proposer", "DraftModelProposer", "MTPProposer", "NgramProposer"]
