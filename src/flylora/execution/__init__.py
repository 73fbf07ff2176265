"""Sandboxed execution of generated code (see sandbox.py and _child.py)."""
from .sandbox import ExecResult, Limits, default_workers, run_program, run_programs, sandbox_features

__all__ = ["ExecResult", "Limits", "default_workers", "run_program", "run_programs", "sandbox_features"]
