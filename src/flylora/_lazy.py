"""Registering the flylora methods with PEFT without importing PEFT at `import flylora`.

Importing `flylora.tuners` registers every method (writes PEFT's mapping dicts). `import flylora`
must keep that promise, but importing PEFT costs seconds, which `flylora --help` should not pay.
So: if PEFT is already imported, register now; otherwise put a one-shot finder on
`sys.meta_path` that wraps PEFT's loader, and register right after PEFT's own `__init__` has
run, before the `import peft` statement that triggered it returns. Every use of PEFT after
`import flylora` therefore sees the methods, as before.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_TUNERS = "flylora.tuners"


def _register() -> None:
    # `flylora.tuners` may be mid-import already (it imports peft, which fires the hook): then
    # this returns the partial module and its own import finishes the registration
    importlib.import_module(_TUNERS)


class _PeftHook(importlib.abc.MetaPathFinder):
    """Finds `peft` (through the other finders) and registers flylora once it has loaded.

    It stays on sys.meta_path until PEFT is actually executed: `importlib.util.find_spec("peft")`
    (transformers' is_peft_available) also asks the finders, and that spec is thrown away."""

    _busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft" or self._busy:
            return None
        self._busy = True  # the lookup below asks the finders again, this one included
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        hook = self

        def exec_then_register(module):
            exec_module(module)
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(hook)
            try:
                _register()
            except Exception as e:  # keep peft importable; say why the methods are missing
                warnings.warn(f"flylora: registering the methods with PEFT failed: {e!r}", stacklevel=2)

        spec.loader.exec_module = exec_then_register
        return spec


def register_with_peft() -> None:
    """Register now if PEFT is loaded, else as soon as it is imported."""
    if "peft" in sys.modules:
        _register()
    elif not any(isinstance(f, _PeftHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftHook())


def lazy_attributes(package: str, exports: dict[str, str], submodules, namespace: dict):
    """`(__getattr__, __dir__)` for a package whose public names are imported on first access
    (PEP 562): `exports` maps a name to the submodule (relative to `package`, no leading dot) that
    defines it; `submodules` are attributes that are submodules themselves. A resolved name is
    stored in `namespace` (the package's globals()), so later accesses skip __getattr__."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
