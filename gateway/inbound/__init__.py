"""The inbound pipeline: transport-agnostic checks from wire bytes to a committed inbox row."""

from gateway.inbound.context import (
    InboundContext,
    InboundEnv,
    InboundRequest,
    InboundResult,
    OnReceipt,
    ReceivedReceipt,
)
from gateway.inbound.pipeline import InboundPipeline, problem_document
from gateway.inbound.stages import STAGES, Stage

__all__ = [
    "STAGES",
    "InboundContext",
    "InboundEnv",
    "InboundPipeline",
    "InboundRequest",
    "InboundResult",
    "OnReceipt",
    "ReceivedReceipt",
    "Stage",
    "problem_document",
]
