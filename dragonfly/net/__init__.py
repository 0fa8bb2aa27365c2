"""The trio I/O the roles share: websocket channels, the h11 server and client,
sendfile/splice, TLS. The formats they carry live in dragonfly/wire/."""
