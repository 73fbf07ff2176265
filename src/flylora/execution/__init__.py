"""Sandboxed execution of generated code (see sandbox.py and _child.py)."""
from .sandbox import Check, ExecResult, Limits, default_workers, run_program, run_programs, sandbox_features

__all__ = ["Check", "ExecResult", "Limits", "default_workers", "run_program", "run_programs", "sandbox_features"]
