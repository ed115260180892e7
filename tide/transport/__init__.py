"""Where tide meets the outside world: record streams and weight channels.

Each is a small interface with an in-memory implementation (unit tests, single process) and a
Redis one (the real system). Only this subpackage may import redis; the rest of tide stays pure.
"""
