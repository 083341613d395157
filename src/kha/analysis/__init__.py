"""Looking at results: tables with paired statistics (``tables``), loss curves and grid plots (``plots``),
learned knock matrices and their movement from the init (``knocks``)."""
