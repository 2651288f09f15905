"""tiered_routing: Mixture-of-Experts language models with tiered routing.

Tier 1 is a fixed lookup from a sample's language to a strict partition; tier 2
is learned top-k token gating inside a partition. Nothing is registered at
import time: gin files import the task modules they need.
"""

__version__ = "0.1.0"
