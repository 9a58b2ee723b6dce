"""Builders shared by the tests, importable as ``tests.helpers.<module>`` (pytest's ``pythonpath``).

* :mod:`tests.helpers.slides` — synthetic slides with a known tissue mask, the real CMU test slide;
* :mod:`tests.helpers.coded_cache` — LMDB patch caches whose patch colours encode (slide, scale, index);
* :mod:`tests.helpers.cache` — reading an LMDB cache back for byte-level comparisons;
* :mod:`tests.helpers.cli` — the demo config shrunk to seconds for in-process ``e2e-wsi fit`` runs;
* :mod:`tests.helpers.fixtures` — pytest fixtures over these, registered in ``tests/conftest.py``.
"""
