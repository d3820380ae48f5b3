"""Build-time helpers used by setup.py and noxfile.py: target resolution and compiler command lines.
Stdlib only: must import without torch, pybind11 or any compiler present."""
