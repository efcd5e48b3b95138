"""The broker fixture is a real Mosquitto: QoS 1 messages go through it."""

import threading

import paho.mqtt.client as mqtt


def test_real_mosquitto_delivers_qos1(broker):
    got = threading.Event()
    payloads = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t-sub")
    sub.on_message = lambda _c, _u, m: (payloads.append(m.payload), got.set())
    sub.connect(broker.host, broker.port)
    sub.subscribe("prapa/v1/test/#", qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t-pub")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        import time
        time.sleep(0.3)
        pub.publish("prapa/v1/test/meter-001/bringup", b"x", qos=1).wait_for_publish(5)
        assert got.wait(5)
        assert payloads == [b"x"]
    finally:
        pub.loop_stop()
        sub.loop_stop()
