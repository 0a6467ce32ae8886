"""Training and evaluation of the DSMI networks on the re-id benchmarks, and the `dsmi` CLI."""
