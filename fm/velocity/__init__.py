"""Velocity on AnnData and corpora: neighbourhoods and moments (DESIGN §9), and velocity teachers.

Conversion (``fm prep convert``), ``fm velocity`` and ``fm predict`` all reach this package, so a model trained on
moments sees the same moments at prediction.
"""
