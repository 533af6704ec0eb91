"""The agent-server API (OpenHands 1.x) served by convsvc, with real openhands-sdk workers, and
the same client suite against a stock agent-server 1.58.2 (run in the SDK's venv, Python 3.12,
by scripts/test-openhands)."""
