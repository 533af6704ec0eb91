"""The OpenHands adapter: ``RemoteConversationManager`` runs OpenHands' conversations in
convsvc. Select it with
``CONVERSATION_MANAGER_CLASS=convclient.openhands.RemoteConversationManager``.

This package is the only part of convclient that imports OpenHands (0.41 to 0.62).
"""

from convclient.openhands.manager import RemoteConversationManager

__all__ = ["RemoteConversationManager"]
