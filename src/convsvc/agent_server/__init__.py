"""The OpenHands agent-server API (1.x), served by convsvc: the SDK's RemoteConversation, the
Agent Canvas and the V1 app server use convsvc as an agent-server backend, while every
conversation runs on an ``openhands-sdk`` worker and every event is in convsvc's log."""
