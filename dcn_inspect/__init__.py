"""dcn-inspect: look at what the offsets of deformable convolutional networks learned."""

__version__ = "0.1.0"
