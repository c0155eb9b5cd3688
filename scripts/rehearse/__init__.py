"""The replica rehearsal's parts (driven by scripts/rehearse_replicas.py): the processes and
their bounded waits (procs), the client load (load), the two routers (routers) and Prometheus
with the canonical queries (prom)."""
