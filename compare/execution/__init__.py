"""Executing work: worker processes, locally (executor) or on a Ray cluster (rayexec), the environments they
run in, and progress."""
