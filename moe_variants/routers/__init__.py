"""Routers. Each is one file here plus one ``conf/router/<name>.yaml`` whose ``_target_`` points at it."""
