"""The product: the Hydra apps (`lcgraph-train`, `lcgraph-plan`), the config schema and its validation,
one rank's training job and the training loop, launching ranks, and helpers for tests.

Owns: the command line and the config. May import: every other lcgraph package.
"""
