"""Scripts that print figures; `python -m benchmarks` lists them, `python -m benchmarks NAME [ARGS]` runs one."""
