"""The seed's demo: an echo upstream like Kong's `echo` service, and a launcher for `make run`."""
