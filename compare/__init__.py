"""The orchestrator: CLI, worker subprocesses, pandas reports. Never imports a framework."""
