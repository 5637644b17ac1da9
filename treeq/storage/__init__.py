"""Checkpoints on disk: writing, reading, inspecting and describing them, through the formats
registered in :mod:`treeq.formats`."""
