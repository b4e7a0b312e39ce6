"""The consumer side of ops/demo.sh: an operator opens an account, grants it
credits and issues an API key; a consumer streams a chat completion with the
official OpenAI SDK. Prints the receipt id last, alone on its line."""

import json
import sys
import urllib.request

from openai import OpenAI

base, admin_token, model = sys.argv[1:4]


def admin(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"authorization": "Bearer " + admin_token, "content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


account = admin("/admin/accounts", {})["account"]
admin("/admin/grants", {"account": account, "amount_micro": 10_000_000})
key = admin("/admin/keys", {"account": account})["secret"]
print(f"account {account}: 10 credits granted; API key issued")

client = OpenAI(base_url=base + "/v1", api_key=key)
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "In one sentence, why share idle GPUs?"}],
    max_tokens=48,
    stream=True,
    stream_options={"include_usage": True},
)
receipt = None
print("assistant: ", end="", flush=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage is not None:
        print(f"\nbilled: {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens")
    receipt = (getattr(chunk, "model_extra", None) or {}).get("troop_receipt", receipt)

req = urllib.request.Request(base + "/v1/account", headers={"authorization": "Bearer " + key})
with urllib.request.urlopen(req) as r:
    acct = json.load(r)
print(f"balance: {acct['balance_micro']} micro-credits, {len(acct['holds'])} open holds")
print(receipt)
