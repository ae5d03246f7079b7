"""What a run writes and records: the prediction's arrays, its bookkeeping and lifecycle, pyramids,
OME-Zarr, previews."""
