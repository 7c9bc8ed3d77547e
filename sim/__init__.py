"""The simulated payment world (config, ground truth, closed-loop play) and the policies it scores."""

from sim.config import BUILTIN_WORLDS, WorldConfig, WorldConfigError, load_world, parse_world
from sim.world import Belief, Outcome, Payment, World

__all__ = [
    "BUILTIN_WORLDS",
    "Belief",
    "Outcome",
    "Payment",
    "World",
    "WorldConfig",
    "WorldConfigError",
    "load_world",
    "parse_world",
]
