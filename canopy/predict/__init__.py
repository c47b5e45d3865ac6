"""Prediction: model tiles blended without seams (``blend``), one raster (``raster``), an area of
interest on Dask (``engine``: ``grid`` cells, ``sources`` imagery, ``manifest`` resume, ``mosaic``
outputs), and the GEDI correction's factor field (``correction``)."""
