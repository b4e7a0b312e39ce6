"""Streams one chat completion through Troop with the official OpenAI SDK.

usage: openai_chat.py BASE_URL API_KEY MODEL
Prints one JSON line: the content, the usage chunk and the receipt id.
"""

import json
import sys

from openai import OpenAI

base, key, model = sys.argv[1:4]
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name three colors."}],
    max_tokens=24,
    stream=True,
    stream_options={"include_usage": True},
)
content, usage, receipt = "", None, None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        content += chunk.choices[0].delta.content
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    extra = getattr(chunk, "model_extra", None) or {}
    receipt = extra.get("troop_receipt", receipt)

whole = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    missing = None
except Exception as e:  # the SDK raises NotFoundError with OpenAI's error body
    missing = type(e).__name__
print(json.dumps({
    "content": content,
    "usage": usage,
    "receipt": receipt,
    "whole_content": whole.choices[0].message.content,
    "whole_usage": whole.usage.model_dump(),
    "missing_model_error": missing,
}))
