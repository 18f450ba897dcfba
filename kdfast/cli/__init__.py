"""The top floor: the command line (``kdfast ...``), the YAML runner's entry point and the demo tour.

Nothing below this package imports it.
"""
