"""kgate: a gateway that meters and limits inference-time compute per caller of a model API."""

__version__ = "0.1.0"
