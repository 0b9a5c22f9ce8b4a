"""OpenAI's Conversations API: a conversation is a stored list of items that responses continue from
(`conversation` on POST /v1/responses) and append their exchange to. Sealed and owned like stored
responses (web/resources/responses.py, appliance/conversations)."""

from __future__ import annotations

import time
from collections.abc import Callable

import falcon

from appliance.conversations import ConversationStore
from appliance.settings import ConversationSettings
from appliance.web.errors import BadRequest, NotFound
from appliance.web.resources.responses import new_items, owner_of, page
from appliance.web.responses import Json, conversation_object
from appliance.web.schemas import ConversationCreateRequest, ConversationItemsRequest, ConversationUpdateRequest, parse

__all__ = ["Conversations", "OneConversation", "ConversationItems", "ConversationItem", "check_room"]


class Conversations:
    """POST /v1/conversations. (One resource class per route, as in responses.py.)"""

    def __init__(
        self, store: ConversationStore, settings: ConversationSettings, *, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.max_items = settings.max_items_per_conversation
        self._wall_clock = wall_clock

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = parse(ConversationCreateRequest, req.context.json)
        items = new_items(self.store, list(body.items or []))
        check_room(0, len(items), self.max_items, "items")
        cid = self.store.record_id("conversation")
        record = {"id": cid, "created_at": int(self._wall_clock()), "metadata": dict(body.metadata or {}), "items": items}
        self.store.put("conversation", cid, owner_of(req), record)
        resp.media = conversation_object(record)


class OneConversation:
    """GET, POST (its metadata) and DELETE /v1/conversations/{conversation_id}."""

    def __init__(self, store: ConversationStore) -> None:
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response, conversation_id: str) -> None:
        resp.media = conversation_object(self.store.get("conversation", conversation_id, owner_of(req)))

    def on_post(self, req: falcon.Request, resp: falcon.Response, conversation_id: str) -> None:
        body = parse(ConversationUpdateRequest, req.context.json)
        record = self.store.update("conversation", conversation_id, owner_of(req),
                                   lambda conv: {**conv, "metadata": dict(body.metadata)})
        resp.media = conversation_object(record)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, conversation_id: str) -> None:
        self.store.delete("conversation", conversation_id, owner_of(req))
        resp.media = {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


class ConversationItems:
    """GET (a page) and POST (append) /v1/conversations/{conversation_id}/items."""

    def __init__(self, store: ConversationStore, settings: ConversationSettings) -> None:
        self.store = store
        self.max_items = settings.max_items_per_conversation

    def on_get(self, req: falcon.Request, resp: falcon.Response, conversation_id: str) -> None:
        conv: Json = self.store.get("conversation", conversation_id, owner_of(req))
        resp.media = page(conv["items"], req)

    def on_post(self, req: falcon.Request, resp: falcon.Response, conversation_id: str) -> None:
        body = parse(ConversationItemsRequest, req.context.json)
        items = new_items(self.store, list(body.items))

        def append(conv: Json) -> Json:
            check_room(len(conv["items"]), len(items), self.max_items, "items")
            return {**conv, "items": [*conv["items"], *items]}

        self.store.update("conversation", conversation_id, owner_of(req), append)
        resp.media = {"object": "list", "data": items, "first_id": items[0]["id"], "last_id": items[-1]["id"],
                      "has_more": False}


class ConversationItem:
    """GET and DELETE /v1/conversations/{conversation_id}/items/{item_id} (DELETE answers the conversation)."""

    def __init__(self, store: ConversationStore) -> None:
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response, conversation_id: str, item_id: str) -> None:
        conv: Json = self.store.get("conversation", conversation_id, owner_of(req))
        found = next((it for it in conv["items"] if it["id"] == item_id), None)
        if found is None:
            raise _no_item(item_id)
        resp.media = found

    def on_delete(self, req: falcon.Request, resp: falcon.Response, conversation_id: str, item_id: str) -> None:
        def remove(conv: Json) -> Json:
            kept = [it for it in conv["items"] if it["id"] != item_id]
            if len(kept) == len(conv["items"]):
                raise _no_item(item_id)
            return {**conv, "items": kept}

        resp.media = conversation_object(self.store.update("conversation", conversation_id, owner_of(req), remove))


def _no_item(item_id: str) -> NotFound:
    return NotFound(f"No item found with id '{item_id[:80]}' in this conversation.")


def check_room(held: int, adding: int, limit: int, param: str) -> None:
    if held + adding > limit:
        raise BadRequest(
            f"{param}: the conversation holds {held} items; {adding} more would exceed "
            f"conversations.max_items_per_conversation = {limit}", param=param,
        )
