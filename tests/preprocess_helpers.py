"""What several preprocessor tests share: reading an output file and the WildFeedback record fields."""

import json
from pathlib import Path

# Fields of one interaction record in the reference's WildFeedback schema (spec §12.3), in order.
WILDFEEDBACK_RECORD_FIELDS = [
    "id",
    "original_conv_id",
    "turn_id",
    "prompt",
    "completion",
    "user_response",
    "prompt_len",
    "completion_len",
    "total_conv_len",
]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
