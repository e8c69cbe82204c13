"""Realtime rooms over websockets: the per-process hub, connections, and the /ws/rooms endpoint."""
