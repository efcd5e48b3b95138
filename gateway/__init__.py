"""The gateway service for a Raspberry Pi: links, sessions, durable store, MQTT forwarder."""
