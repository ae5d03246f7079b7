"""Prefect flows over the unet-volume library, installed as ``unet_volume_flows``.

Flows are glue: each task is one stage that calls one library function (plan, predict,
record provenance, publish), never one task per block; blocks are Dask's work. Cluster
settings are data in ``deploy/``; a flow gets a scheduler address or a cluster spec name.

- :mod:`unet_volume_flows.train`: weight maps, training, evaluation, registered checkpoint.
- :mod:`unet_volume_flows.predict`: one volume, planned and predicted on a Dask cluster.
- :mod:`unet_volume_flows.ingest`: new volumes in a landing location, each predicted once.
- :mod:`unet_volume_flows.serve`: the three on one machine, ``ingest`` on a schedule.
"""
