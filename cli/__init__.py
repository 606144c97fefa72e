"""The ``circuits`` command line: thin click commands over the library."""
