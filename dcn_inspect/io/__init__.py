"""Input and output: images and the frameworks' resizing, annotations, datasets, run outputs,
progress."""
