"""Foundations every layer uses: errors, shared defaults, CSV column descriptions, frames
(cell <-> pixel) and the kernel grid."""
