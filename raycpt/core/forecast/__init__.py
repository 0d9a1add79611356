"""Forecasts made before or after a run: the memory plan (plan.py) and the schedule-aware CPT law (cpt_law.py)."""
