"""Annotations in and out of the tool: QuPath-compatible GeoJSON (:mod:`e2e_wsi.annotations.geojson`)."""
