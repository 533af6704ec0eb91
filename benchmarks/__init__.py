"""Benchmarks: convsvc beside the floor grpc.aio itself sets on this machine, in one run.

Run with ``scripts/bench`` (``--quick`` for a toy-sized run). Servers and load generators are
separate processes; every goal is a ratio to the floor measured in the same run, or a count.
"""
