"""The packaged families (MiniLM, EfficientNet-Lite0) as model configs, each on a tiny task set
of its kind: shared by the family tests, the family-plugin tests and the zoo's tests."""

MINILM = {"_target_": "mergebench.families.minilm.MiniLMFamily", "source": "zoo"}
EFFICIENTNET = {
    "_target_": "mergebench.families.efficientnet.EfficientNetLite0Family",
    "source": "zoo",
}
TEXT_MODEL = {
    "name": "minilm",
    **MINILM,
    "exclude": [r"classifier\..*"],
    "options": {"max_length": 16},
}
TEXT_SET = {
    "name": "tiny_text",
    "family": "minilm",
    "tasks": ["rt_sentiment", "bbc_news"],
    "examples": {"train": 20, "validation": 8, "test": 12},
}
VISION_MODEL = {"name": "efficientnet_lite0", **EFFICIENTNET, "options": {"image_size": 32}}
VISION_SET = {
    "name": "tiny_vision",
    "family": "efficientnet_lite0",
    "tasks": ["digits", "faces"],
    "examples": {"train": 16, "validation": 8, "test": 12},
}
