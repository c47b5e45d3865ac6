"""FastAPI service: map tiles, point and polygon statistics, prediction jobs, web map (its own issue)."""
