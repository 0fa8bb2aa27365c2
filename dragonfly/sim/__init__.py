"""Swarm simulation: the real scheduler and piece picker in a discrete-event loop.

``python -m dragonfly sim`` (``dragonfly.sim.cli.main``) runs one scenario;
``run_simulation(SimConfig(...))`` is the same from Python.  See swarm.py for what is
modelled, engine.py for the event loop and the bandwidth model, bound.py for T_min.
"""

from dragonfly.sim.bound import fluid_bound, piece_factor
from dragonfly.sim.cli import main
from dragonfly.sim.scenario import SimConfig, SimResult
from dragonfly.sim.swarm import Swarm, run_simulation

__all__ = [
    "SimConfig",
    "SimResult",
    "Swarm",
    "fluid_bound",
    "main",
    "piece_factor",
    "run_simulation",
]
