"""Device profiles shipped with lcgraph (h100.json, h200.json, a100.json); see lcgraph.planner.costs.load_profile."""
