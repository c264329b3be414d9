"""The commands as Python functions: each loads, reads, probes, calls its analysis and writes.

``dcn_inspect.commands.sample_points.sample_points``, ``...dilation_stats.dilation_stats``,
``...bins.bins`` and ``...info.model_info`` take the same options as the command line (as
Python values) and return what they computed along with the paths they wrote.
"""
