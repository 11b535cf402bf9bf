"""Feedback-alignment layers and rules: FA dense/conv/untied layers, DFA wiring, FA-aware step, alignment."""

from fasweep.nn.alignment import alignment, angle, exact_backprop
from fasweep.nn.convert import convert
from fasweep.nn.dfa import finalize
from fasweep.nn.layers import FAConv2d, FALayer, FALinear
from fasweep.nn.rules import RULES, FeedbackRule, make_rule
from fasweep.nn.step import clip_weights, optimizer_step, step_overflows
from fasweep.nn.untied import UntiedConv2d

__all__ = [
    "RULES",
    "FAConv2d",
    "FALayer",
    "FALinear",
    "FeedbackRule",
    "UntiedConv2d",
    "alignment",
    "angle",
    "clip_weights",
    "convert",
    "exact_backprop",
    "finalize",
    "make_rule",
    "optimizer_step",
    "step_overflows",
]
