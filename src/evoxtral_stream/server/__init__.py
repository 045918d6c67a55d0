"""Network edges: WebSocket server, protocol codecs and broadcast."""
