"""The protocols: CBOR messages, websocket channels, h11 server and client, sendfile bodies."""
