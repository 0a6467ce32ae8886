"""The ``dsmi`` command: its own home, apart from the library packages (see :mod:`.main`)."""
