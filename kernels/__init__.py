"""lorafx's kernels, one file per op; the package is `lorafx.kernels` (pyproject's package-dir).

A python started in the repo root has the root first on sys.path, so `import kernels` would
find this folder instead of PyPI's `kernels`, which transformers (and so peft) imports. When
this file runs under that top-level name it hands the import over to the installed package,
as if the repo root were not on sys.path; as `lorafx.kernels` it does nothing.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    _path = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds at the end
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules[__name__]
        raise
