"""The small sample network trained for the bundled weights. Being written."""
