"""Test helpers, imported explicitly (``from helpers.common import run``): execution modes and
tolerances (``common``), the independent float64 NumPy references of the ops (``reference``) and of
the NSA forward (``nsa_reference``), random NSA cases (``nsa_cases``), hypothesis layouts
(``strategies``) and the MindFormers set-up (``mindformers``). Nothing here imports the code under
test's internals to compute an expectation."""
