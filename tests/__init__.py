"""e2e-wsi tests. A regular package, so `tests.helpers` is ours even where a dependency's wheel (torchstain)
installs a top-level `tests` package into site-packages."""
