"""The native CPU expert engine (C++, module `_engine`, built by the package build).

`native_engine` is the compiled module or None; `native_error` says why it is None ("" when
loaded). Importing this package never raises, so the torch expert backend can take over.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["native_engine", "native_error"]

_BUILD_HINT = "build it with: pip install --no-build-isolation --no-deps -e ."

native_engine: ModuleType | None
native_error: str

try:
    from twinfer.native import _engine as native_engine

    native_error = ""
except Exception as exc:  # NOTE: also OSError/undefined symbols: never break `import twinfer`
    native_engine = None
    native_error = f"the native CPU expert engine is not available ({exc}); {_BUILD_HINT}"
