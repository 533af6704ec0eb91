"""OpenHands' EventStoreABC over the service's event search.

OpenHands iterates event stores synchronously (on its event loop's thread), so this store
uses the blocking client; each page is one short call under the client's deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from openhands.events.event import Event
from openhands.events.event_filter import EventFilter
from openhands.events.event_store_abc import EventStoreABC
from openhands.events.serialization.event import event_from_dict

from convclient.sync_client import ConvsvcClient

_PAGE_SIZE = 100


class RemoteEventStore(EventStoreABC):
    """The event log of one conversation, read from convsvc."""

    def __init__(
        self,
        client: ConvsvcClient,
        sid: str,
        user_id: str | None,
        *,
        on_search_complete: Callable[[int], None] | None = None,
    ) -> None:
        self.sid = sid
        self.user_id = user_id
        self._client = client
        # Told the highest id a finished forward search covered: how a connection's relay
        # learns where OpenHands' replay of its backlog ended.
        self._on_search_complete = on_search_complete

    def search_events(
        self,
        start_id: int = 0,
        end_id: int | None = None,
        reverse: bool = False,
        filter: EventFilter | None = None,
        limit: int | None = None,
    ) -> Iterator[Event]:
        if limit is not None and limit <= 0:
            return
        covered = max(start_id, 0) - 1
        returned = 0
        for stored in self._client.iter_events(
            self.sid,
            user_id=self.user_id or "",
            start_id=max(start_id, 0),
            end_id=end_id,
            reverse=reverse,
            page_size=_PAGE_SIZE,
        ):
            covered = max(covered, stored.id)
            event = event_from_dict(stored.payload)
            if filter is not None and not filter.include(event):
                continue
            yield event
            returned += 1
            if limit is not None and returned >= limit:
                return
        if self._on_search_complete is not None and not reverse and end_id is None:
            self._on_search_complete(covered)

    def get_event(self, id: int) -> Event:
        for event in self.search_events(start_id=id, end_id=id):
            return event
        raise FileNotFoundError(f"conversation {self.sid} has no event {id}")

    def get_latest_event(self) -> Event:
        for event in self.search_events(reverse=True, limit=1):
            return event
        raise FileNotFoundError(f"conversation {self.sid} has no events")

    def get_latest_event_id(self) -> int:
        return self._client.get_conversation(self.sid, user_id=self.user_id or "").latest_event_id
