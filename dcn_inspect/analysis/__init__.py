"""Analysis: one module per figure or table, pure functions over captured records (no CLI words,
no file writing)."""
