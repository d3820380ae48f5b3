"""Transfer machinery shared by the copy backends: segment tables, the path planner and its executor.
Must not import torch or any backend at package import."""
