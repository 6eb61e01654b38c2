"""`make soak`: several thousand concurrent sessions of mixed traffic through a real pyproxy, bounded in
time."""
