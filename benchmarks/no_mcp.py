"""OpenHands' MCP configuration without its own MCP server (the web server's /mcp/mcp).

The standalone manager adds that server to every conversation; outside a running web server
nothing answers there and each start waits for the connection to time out. The workers do
not add it either, so the comparison is fair. Selected with OPENHANDS_MCP_CONFIG_CLS."""

from __future__ import annotations

from typing import Any

from openhands.core.config.mcp_config import OpenHandsMCPConfig


class WithoutOpenHandsServer(OpenHandsMCPConfig):  # type: ignore[misc]
    @staticmethod
    def create_default_mcp_server_config(
        host: str, config: Any, user_id: str | None = None
    ) -> tuple[None, list[Any]]:
        return None, []
