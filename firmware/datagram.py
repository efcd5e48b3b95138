# The data link over IP: one secure frame a datagram to the gateway's UDP link.
# Shared by both HALs; the ESP32's subclass first joins Wi-Fi (ready()).
# Nothing here blocks: a datagram that cannot go is dropped and counted, like
# bytes on a dead wire, and the uplink's retries do the rest.
import socket


class Datagrams:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.addr = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.dropped_tx = 0

    def ready(self):
        if self.addr is None:
            self.addr = socket.getaddrinfo(self.host, self.port)[0][-1]
        return True

    def recv_into(self, buf):
        try:
            return self.sock.readinto(buf) or 0
        except OSError:
            return 0

    def send(self, data):
        if not self.ready():
            self.dropped_tx += len(data)
            return 0
        try:
            return self.sock.sendto(data, self.addr)
        except OSError:
            self.dropped_tx += len(data)
            return 0
