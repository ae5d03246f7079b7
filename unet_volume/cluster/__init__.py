"""Dask clusters: clients, cluster specs, bounded submission, the workers' native heap."""
