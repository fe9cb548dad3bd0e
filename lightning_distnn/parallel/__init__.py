"""Pure-torch parallelism: small functions that take a module, a mesh or group, and narrow config.

Strategies in :mod:`lightning_distnn.strategies` are thin Lightning wrappers over these.
"""
