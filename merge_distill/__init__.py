"""merge-distill: merge domain experts into one student by G-OPD / ExOPD."""
__version__ = "0.1.0"
