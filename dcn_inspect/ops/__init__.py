"""Deformable ops: deformable conv (v1, modulated v2), deformable RoI and PS RoI pooling.

The functions dispatch to the native C++/CUDA extension when it is built (see
:mod:`dcn_inspect.ops._native`) and to :mod:`dcn_inspect.ops.reference` otherwise;
``DCN_INSPECT_OPS=reference|native`` forces one. The modules are drop-ins for torchvision's
and mmcv's (see :mod:`dcn_inspect.ops.modules` for the differences that remain).
"""

from dcn_inspect.ops._backend import info as backend_info
from dcn_inspect.ops.functional import deform_conv2d, deform_psroi_pool, deform_roi_pool
from dcn_inspect.ops.modules import (
    DeformConv2d,
    DeformConv2dPack,
    DeformPSRoIPool,
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformConv2dPack,
    ModulatedDeformRoIPoolPack,
)


def release_scratch() -> int:
    """Free the idle scratch memory the native CPU kernels keep between calls (bounded by
    ``DCN_INSPECT_SCRATCH_MIB``, default 256 MiB); returns the bytes freed (0 when the native
    ops are not loaded)."""
    from dcn_inspect.ops import _native

    return _native.release_scratch() if _native.is_loaded() else 0


__all__ = [
    "backend_info",
    "deform_conv2d",
    "deform_roi_pool",
    "deform_psroi_pool",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2dPack",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    "DeformPSRoIPool",
    "release_scratch",
]
