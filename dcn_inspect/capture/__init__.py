"""Capture: what a forward's deformable calls used (records, the capture session, the adapter
registry and its adapters)."""
