"""Deformable ResNets (paper setting and mmdetection setting). Being written."""
