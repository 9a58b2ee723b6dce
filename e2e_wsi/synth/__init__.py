"""Synthetic cohorts: H&E-like pyramidal slides with known lesions, truth masks and a manifest.

Synthesis only writes slides (through :mod:`e2e_wsi.slides.writer`); it never reads them, and the
reader never depends on it.
"""

from e2e_wsi.synth.cohort import TASKS, render_slide, synthesize_cohort

__all__ = ["TASKS", "render_slide", "synthesize_cohort"]
