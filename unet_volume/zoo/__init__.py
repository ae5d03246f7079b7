"""Models to and from the bioimage.io model zoo (format 0.5).

An optional extra: ``pip install 'unet-volume[bioimageio]'``.

:mod:`~unet_volume.zoo.export` writes a checkpoint as a model package that bioimageio.core,
ilastik, deepImageJ, QuPath and BiaPy read. Everything here imports ``bioimageio.spec``, an
optional dependency: the command line imports this folder only for the commands that use it.
"""
