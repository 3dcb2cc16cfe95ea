"""Framework-free core of bn-compare: configuration, data, initial parameters,
the float64 reference, the backend interface and the one training loop.

Nothing in this package imports a deep-learning framework; it needs numpy
(1.23 or 2.x) and the standard library only.
"""
