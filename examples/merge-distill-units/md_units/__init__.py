"""Example merge-distill grader plugin for the toy world's ``units`` domain."""

from md_units.grader import UnitsGrader, canonical_unit, extract_answer, parse_quantity

__all__ = ["UnitsGrader", "canonical_unit", "extract_answer", "parse_quantity"]
