"""`make bench`: pyproxy measured against nginx's stream module and HAProxy (issue 4).

Run `python -m bench.run` (or `make bench`, `make bench-smoke`); `python -m bench.profile` profiles
pyproxy's workers under load with py-spy and strace.
"""
