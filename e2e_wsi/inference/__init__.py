"""Inference with trained models: the library behind ``predict``, ``heatmap``, the notebook and benchmarks.

Models come from :func:`e2e_wsi.runs.load_run`.

* :mod:`~e2e_wsi.inference.attention`: the one place a model runs on a slide: attention over its cached
  patches (``slide_attention``), over overlapping patches read from the file (``overlap_attention``),
  predictions of a bag (``predict_bag``); the result type ``SlideAttention`` that viz draws,
* :mod:`~e2e_wsi.inference.predict`: ensembles of checkpoints (``Ensemble``),
* :mod:`~e2e_wsi.inference.params`: new slides tiled like a run's training slides,
* :mod:`~e2e_wsi.inference.slides`: tiling new slides like the training slides,
* :mod:`~e2e_wsi.inference.heatmaps`: heatmap figures of a model (``make_heatmap``,
  ``make_overlap_heatmap``), drawn by :mod:`e2e_wsi.viz`; :mod:`~e2e_wsi.inference.heatmap_cli` is
  ``e2e-wsi heatmap``,
* :mod:`~e2e_wsi.inference.features`: attention and heatmaps of feature (two-stage) runs at the
  features' coordinates (``feature_attention``, ``make_feature_heatmap``),
* :mod:`~e2e_wsi.inference.pipeline` / :mod:`~e2e_wsi.inference.outputs`: ``e2e-wsi predict`` as a call
  and its files; :mod:`~e2e_wsi.inference.cli` its command line.
"""
