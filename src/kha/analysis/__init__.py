"""Looking at results: loss-curve plots (and, as experiments grow, tables and knock heatmaps)."""
