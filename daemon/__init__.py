"""inferd: a lightweight model-serving daemon (encrypted models, KServe V2 over HTTP and MQTT)."""

__version__ = "0.1.0"
