"""Where is what: imagery, lidar CHMs and point clouds, GEDI shots and boundaries in one spatial index. No torch."""
