"""``python -m unet_volume`` is the ``unet-volume`` command."""

from unet_volume.cli.main import main

raise SystemExit(main())
