"""Builders shared by the tests, importable as ``tests.helpers.<module>`` (pytest's ``pythonpath``).

* :mod:`tests.helpers.slides` — synthetic slides with a known tissue mask, the real CMU test slide;
* :mod:`tests.helpers.coded_cache` — LMDB patch caches whose patch colours encode (slide, scale, index);
* :mod:`tests.helpers.cache` — reading an LMDB cache back for byte-level comparisons;
* :mod:`tests.helpers.cli` — the demo config shrunk to seconds for in-process ``e2e-wsi fit`` runs;

Fixtures built on these live in the ``conftest.py`` beside the tests that use them (``tests/conftest.py``
for the session-wide ones). Test modules import builders from here, never from a ``conftest``.
"""
