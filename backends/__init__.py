"""Backends: one adapter per framework plus the float64 NumPy reference.

Each subpackage imports its framework at import time, so the registry can report a backend whose
framework is missing as unavailable, with the import error as the reason.
"""
