"""Views that write Samples out (NDJSON for --json and record; later Prometheus).
A sink never calls the kernel; it renders what pctop.stats produced."""
