"""Reading pickled weight files without running code from them.

detectron2 model-zoo ``.pkl`` files are plain pickles of ``{"model": {name: numpy array}}``.
:class:`SafeUnpickler` resolves only the few globals such files need -- numpy array and scalar
reconstruction (refusing object arrays), ``_codecs.encode`` for latin-1 byte strings, and
builtin containers -- and refuses every other global, so a file whose unpickling would call
``os.system``, ``exec`` or any class constructor fails before anything runs. None of them
builds a large object from a small file: ``bytearray`` takes bytes, not a length to zero-fill,
and arrays get their data from the file (``_reconstruct`` makes only the empty array that
pickles fill), so memory stays bounded by the file's size. The same guarded
numpy functions are offered to ``torch.load(weights_only=True)`` through :data:`NUMPY_SAFE_GLOBALS`
so PyTorch checkpoints whose metadata holds numpy values also load.
"""

from __future__ import annotations

import builtins
import codecs
import collections
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from dcn_inspect.core.errors import InputError

try:  # numpy >= 2 moved the array constructors to numpy._core; old pickles name numpy.core.
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]


def _check_dtype(dtype: np.dtype) -> np.dtype:
    if dtype.hasobject:
        raise pickle.UnpicklingError(
            "refused: numpy object arrays can hold arbitrary Python objects"
        )
    return dtype


def safe_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` that refuses object dtypes."""
    return _check_dtype(np.dtype(*args))


def safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's array reconstructor, limited to plain ``ndarray`` (no subclasses) and to the empty
    array numpy's own pickles start from (the data follows in the file)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refused: array subclass {subtype!r}")
    if not (
        isinstance(shape, tuple)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and 0 in shape
    ):
        raise pickle.UnpicklingError(
            f"refused: array reconstruction with shape {str(shape)[:40]} "
            "(numpy pickles start empty)"
        )
    return _multiarray._reconstruct(np.ndarray, shape, _check_dtype(np.dtype(dtype)))


def safe_bytearray(*args: Any) -> bytearray:
    """``bytearray`` from bytes, or from a string and its encoding (what pickles of bytearrays
    hold); a length to zero-fill or any other iterable is refused."""
    plain = len(args) <= 1 and all(isinstance(a, (bytes, bytearray)) for a in args)
    encoded = len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], str)
    if not (plain or encoded):
        raise pickle.UnpicklingError("refused: bytearray from anything but bytes")
    return bytearray(*args)


def safe_scalar(dtype: Any, *args: Any) -> Any:
    """numpy's scalar reconstructor, refusing object scalars."""
    return _multiarray.scalar(_check_dtype(np.dtype(dtype)), *args)


def safe_frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 array reconstructor (``numpy.core.numeric._frombuffer``), no object
    dtypes."""
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"refused: array order {order!r}")
    return np.frombuffer(buffer, dtype=_check_dtype(np.dtype(dtype))).reshape(shape, order=order)


def safe_codecs_encode(text: str, encoding: str = "utf-8", *rest: Any) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: str -> latin-1 bytes only."""
    if not isinstance(text, str) or codecs.lookup(encoding).name not in ("latin-1", "iso8859-1"):
        raise pickle.UnpicklingError(f"refused: _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")

#: (module, name) -> the object a safe pickle may use for that global.
ALLOWED_GLOBALS: Dict[Tuple[str, str], Callable[..., Any]] = {
    **{(module, "_reconstruct"): safe_reconstruct for module in _NUMPY_MODULES},
    **{(module, "scalar"): safe_scalar for module in _NUMPY_MODULES},
    **{
        (module, "_frombuffer"): safe_frombuffer
        for module in ("numpy.core.numeric", "numpy._core.numeric")
    },
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): safe_dtype,
    ("_codecs", "encode"): safe_codecs_encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{
        (module, name): getattr(builtins, name)
        for module in ("builtins", "__builtin__")
        for name in ("set", "frozenset")
    },
    **{(module, "bytearray"): safe_bytearray for module in ("builtins", "__builtin__")},
}

#: The guarded numpy reconstructors, in the form ``torch.serialization.safe_globals`` takes; the
#: dtype classes are listed because PyTorch's unpickler only sets state on allow-listed types.
NUMPY_SAFE_GLOBALS: List[Any] = [
    (obj, f"{module}.{name}")
    for (module, name), obj in ALLOWED_GLOBALS.items()
    if module.startswith("numpy")
] + [
    getattr(np.dtypes, name)
    for name in getattr(np.dtypes, "__all__", [])
    if name != "ObjectDType" and isinstance(getattr(np.dtypes, name, None), type)
]


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only containers, strings, numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused: persistent references (not a plain pickle)")


def load_pickle_file(path: Path) -> Any:
    """Unpickle ``path`` with :class:`SafeUnpickler`; one-line :class:`InputError` on refusal or
    corruption."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            # latin1 reads the byte strings of Python-2 era pickles (older detectron/caffe2 files).
            return SafeUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        message = str(exc).splitlines()[0] if str(exc) else "unpickling failed"
        if message.startswith("refused"):
            raise InputError(
                f"{path}: refused to load: {message} "
                "(only arrays, numbers, strings and containers are read)"
            ) from None
        raise InputError(f"{path}: not a readable pickle ({message})") from None
    except (
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        RecursionError,
        OverflowError,
    ) as exc:
        raise InputError(
            f"{path}: not a readable pickle ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
