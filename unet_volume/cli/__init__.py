"""The ``unet-volume`` command: thin over the library, option by option from the config records."""
